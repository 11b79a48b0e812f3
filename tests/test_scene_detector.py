import io
import random
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from megatron_m6.data.images import JPEG_QUALITY, resize_and_crop
from megatron_m6.data.sample_data import (
    ALL_SCENES,
    COLOURS,
    Scene,
    cell_box,
    render_scene,
    render_slotted_scene,
)
from megatron_m6.data.scene_detector import detect_scene, score_attributes

SIZE = 96
ATTRIBUTES = {"colour": "colour", "shape": "shape", "count": "count", "position": "cell"}  # key -> Scene field


def jpeg_round_trip(img):
    """What preprocessing stores: the image as JPEG at the corpus' quality."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def with_specks(img, rng, n=5):
    """img with n specks of 1-4 px (squares of side 1-2) in random colours at random places, as a
    decoder leaves them. Bigger specks survive the detector's opening, and one that lands on or
    against a shape can change how that shape reads."""
    pixels = np.array(img)
    for _ in range(n):
        side, y, x = rng.randint(1, 2), rng.randrange(SIZE - 2), rng.randrange(SIZE - 2)
        pixels[y:y + side, x:x + side] = [rng.randrange(256) for _ in range(3)]
    return Image.fromarray(pixels)


RENDERERS = pytest.mark.parametrize("render", [render_scene, render_slotted_scene])


def misread(images_of_scene, seeds, render):
    """(seed, scene, what was read) for every image render draws that is not read as its scene."""
    wrong = []
    for seed in seeds:
        rng = random.Random(f"detector:{seed}")
        for scene in ALL_SCENES:
            for img in images_of_scene(render(rng, scene, SIZE), rng):
                got = detect_scene(img)
                if not score_attributes(got, scene)["all"]:
                    wrong.append((seed, scene, got))
    return wrong


@RENDERERS
def test_reads_every_scene_as_png_and_after_jpeg(render):
    wrong = misread(lambda img, rng: (img, jpeg_round_trip(img)), seeds=range(3), render=render)
    assert not wrong, f"{len(wrong)} of {2 * 3 * len(ALL_SCENES)} images misread, e.g. {wrong[:3]}"


@RENDERERS
def test_reads_blurred_images_with_specks(render):
    """A VQ-VAE decoder's output is soft-edged and speckled; radius 1 blurs a 2 px gap between
    shapes to about 40% of their ink, so shapes the rules keep apart stay apart."""
    def blurred(img, rng):
        soft = img.filter(ImageFilter.GaussianBlur(1))
        return soft, with_specks(soft, rng)
    wrong = misread(blurred, seeds=range(2), render=render)
    assert not wrong, f"{len(wrong)} of {2 * 2 * len(ALL_SCENES)} images misread, e.g. {wrong[:3]}"


@RENDERERS
def test_reads_other_sizes_and_arrays(render):
    """Preprocessing stores images at the model's resolution (resize_and_crop); they are read at 96 px."""
    rng = random.Random("detector:sizes")
    for scene in ALL_SCENES:
        img = render(rng, scene, SIZE)
        assert detect_scene(resize_and_crop(img, 224)) == scene
        assert detect_scene(np.asarray(img)) == scene


def test_blank_image_has_no_scene():
    blank = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    for img in (blank, with_specks(blank, random.Random(0), n=8), np.full((64, 64, 3), 250, np.uint8)):
        assert detect_scene(img) is None
    assert score_attributes(None, ALL_SCENES[0]) == dict.fromkeys([*ATTRIBUTES, "all"], False)


def test_score_attributes_names_the_wrong_attribute():
    expected = Scene(4, 2, "红色", "圆形")
    assert score_attributes(expected, expected) == dict.fromkeys([*ATTRIBUTES, "all"], True)
    for key, field in ATTRIBUTES.items():
        other = next(s for s in ALL_SCENES if getattr(s, field) != getattr(expected, field))
        score = score_attributes(replace(expected, **{field: getattr(other, field)}), expected)
        assert score == {**dict.fromkeys(ATTRIBUTES, True), key: False, "all": False}, key


def draw(shapes):
    """A 96 px image of (cell, slot, colour, shape) shapes, 12 px each, drawn here by hand: slot 0-3
    is a quarter of the cell, so no two shapes touch."""
    img = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    pen = ImageDraw.Draw(img)
    for cell, slot, colour, shape in shapes:
        x0, y0, _, _ = cell_box(cell, SIZE)
        x, y = x0 + 2 + 16 * (slot % 2), y0 + 2 + 16 * (slot // 2)
        box = (x, y, x + 11, y + 11)
        if shape == "圆形":
            pen.ellipse(box, fill=COLOURS[colour])
        elif shape == "正方形":
            pen.rectangle(box, fill=COLOURS[colour])
        else:
            pen.polygon([(x, y + 11), (x + 11, y + 11), (x + 5.5, y)], fill=COLOURS[colour])
    return img


@pytest.mark.parametrize("shapes, expected", [
    ([(4, 0, "红色", "圆形"), (4, 1, "红色", "圆形"), (4, 3, "蓝色", "正方形")], Scene(4, 3, "红色", "圆形")),
    ([(0, 0, "绿色", "三角形"), (0, 2, "绿色", "三角形"), (8, 1, "黄色", "三角形")], Scene(0, 3, "绿色", "三角形")),
    ([(2, slot, "蓝色", "正方形") for slot in range(4)] + [(6, 0, "蓝色", "正方形")], Scene(2, 5, "蓝色", "正方形")),
])
def test_shapes_that_disagree_give_the_majority(shapes, expected):
    assert detect_scene(draw(shapes)) == expected


def ink(img):
    return (255 - np.asarray(img, dtype=np.int16)).max(axis=-1) > 0


def test_slotted_scenes_are_shapes_drawn_by_hand_in_the_cells_quarters():
    """render_slotted_scene puts each shape where draw() above puts it by hand, 12 px in one of the
    cell's quarters: at 96 px every shape covers the same 2 x 2 codes of an f8 tokenizer."""
    rng, slots_used = random.Random("slots"), set()
    for scene in ALL_SCENES:
        img = render_slotted_scene(rng, scene, SIZE)
        x0, y0, x1, y1 = cell_box(scene.cell, SIZE)
        drawn = ink(img)
        assert not drawn[:y0].any() and not drawn[y1:].any() and not drawn[:, :x0].any() and not drawn[:, x1:].any()
        slots = [slot for slot in range(4) if drawn[y0 + 16 * (slot // 2):, x0 + 16 * (slot % 2):]
                 [:16, :16].any()]
        assert len(slots) == scene.count, scene
        assert np.array_equal(drawn, ink(draw([(scene.cell, slot, "红色", scene.shape) for slot in slots]))), scene
        colours = np.unique(np.asarray(img)[drawn], axis=0)
        assert len(colours) == 1 and np.abs(colours[0] - COLOURS[scene.colour]).max() <= 20, scene
        slots_used.add((scene.count, tuple(slots)))
    assert len(slots_used) > 9, "the slots are not chosen at random"
