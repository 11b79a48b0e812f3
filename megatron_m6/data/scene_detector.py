"""Read a sample-data scene back from pixels, to score text-to-image generation automatically.

The sample data's drawing rules (sample_data.render_scene and render_slotted_scene) make a scene
easy to read: 1-3 identical solid shapes of one named colour on white, inside one grid cell, at
least 2 px apart. A generated
image comes out of a VQ-VAE decoder blurred, with soft edges, slightly shifted colours and stray
specks, so each reading here is one that blur leaves alone: a shape's pixels are those darker than
half its ink (where a blurred edge crosses the drawn one), specks are opened away, a triangle is
told by where its weight sits, a square from a circle by how much of its box it fills, and the
colour by the median pixel, which lies inside the shape.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from PIL import Image

from megatron_m6.data.sample_data import COLOURS, SHAPES, Scene

NOMINAL_SIZE = 96  # the sample data's default image size; other sizes are resized to it
# Ink is a pixel's largest per-channel distance from white (every named colour, jittered, has
# 195-245). Pixels above INK_FLOOR are not background, even in a JPEG; a shape's pixels are those
# above half the image's shape ink, where a blurred edge crosses the drawn one whatever the colour's
# strength, and where a 2 px gap between drawn shapes stays below the threshold after blur.
INK_FLOOR, EDGE_FRACTION = 60, 0.5
MIN_AREA = 20  # px at NOMINAL_SIZE: the smallest drawn shapes (8 px) keep ~30 after _open, specks fewer
# A triangle (apex up) has its centroid 2/3 of the way down its bounding box (0.57-0.64 once _open
# has blunted the apex), a circle and a square at 1/2; a circle fills pi/4 of its box, a square all
# of it. The cut points lie midway between the values measured on drawn shapes, as PNG, as JPEG and
# blurred (with specks), and tests/test_scene_detector.py checks every scene that way.
TRIANGLE_CENTROID_BELOW, SQUARE_FILL_ABOVE = 0.55, 0.86
_COLOUR_NAMES = list(COLOURS)
_COLOUR_VALUES = np.array([COLOURS[name] for name in _COLOUR_NAMES], dtype=np.float64)


def _as_pixels(image: Image.Image | np.ndarray, size: int) -> np.ndarray:
    """image as a size x size x 3 int array, resized when it is another size."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(np.asarray(image, dtype=np.uint8))
    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    return np.asarray(image, dtype=np.int16)


def _neighbourhoods(values: np.ndarray, fill: int | bool) -> list[np.ndarray]:
    """values shifted to each of the 3 x 3 neighbourhood's positions, fill beyond the border."""
    p = np.pad(values, 1, constant_values=fill)
    h, w = values.shape
    return [p[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)]


def _open(mask: np.ndarray) -> np.ndarray:
    """mask less every part that no 3 x 3 square inside it covers: specks of a few pixels, and the
    specks or thin bridges a blurred image attaches to a shape, go; drawn shapes keep their outline."""
    eroded = np.logical_and.reduce(_neighbourhoods(mask, True))
    return np.logical_or.reduce(_neighbourhoods(eroded, False)) & mask


def _label_components(mask: np.ndarray) -> np.ndarray:
    """4-connected components of mask: each pixel gets the largest pixel index in its component
    (0 off the mask). Labels spread one pixel a step, so steps are as many as a shape is wide."""
    labels = np.where(mask, np.arange(1, mask.size + 1).reshape(mask.shape), 0)
    while True:
        p = np.pad(labels, 1)
        spread = np.where(mask, np.maximum.reduce([labels, p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]]), 0)
        if np.array_equal(spread, labels):
            return labels
        labels = spread


def _shape_mask(pixels: np.ndarray) -> np.ndarray:
    """The pixels that belong to shapes (nothing when the image is blank)."""
    ink = (255 - pixels).max(axis=-1)
    if not (ink > INK_FLOOR).any():
        return np.zeros(ink.shape, dtype=bool)
    shape_ink = np.percentile(ink[ink > INK_FLOOR], 90)  # shapes' insides, which outnumber their edges
    return _open(ink > max(INK_FLOOR, EDGE_FRACTION * shape_ink))


def _read_shape(pixels: np.ndarray, ys: np.ndarray, xs: np.ndarray, size: int) -> tuple[int, str, str]:
    """(grid cell of its centre, colour name, shape name) of one component."""
    top, bottom, left, right = ys.min(), ys.max(), xs.min(), xs.max()
    if (ys.mean() - top) / max(bottom - top, 1) > TRIANGLE_CENTROID_BELOW:
        shape = SHAPES[2]
    else:
        shape = SHAPES[1] if len(ys) / ((bottom - top + 1) * (right - left + 1)) > SQUARE_FILL_ABOVE else SHAPES[0]
    cell = int((top + bottom) / 2 * 3 // size) * 3 + int((left + right) / 2 * 3 // size)
    median = np.median(pixels[ys, xs], axis=0)
    colour = _COLOUR_NAMES[int(np.argmin(((_COLOUR_VALUES - median) ** 2).sum(axis=1)))]
    return cell, colour, shape


def detect_scene(image: Image.Image | np.ndarray, image_size: int = NOMINAL_SIZE) -> Scene | None:
    """The scene image shows, read by the sample data's drawing rules; None when it shows no shape.

    Where shapes disagree (a generated image may draw a red circle beside a blue square), each of
    cell, colour and shape is the most common among them, and count is the number of shapes, which
    may be above 3: a result that scores as wrong rather than an error.
    """
    pixels = _as_pixels(image, image_size)
    labels = _label_components(_shape_mask(pixels))
    ids, areas = np.unique(labels[labels > 0], return_counts=True)
    min_area = MIN_AREA * (image_size / NOMINAL_SIZE) ** 2
    shapes = [_read_shape(pixels, *np.nonzero(labels == i), image_size) for i in ids[areas >= min_area]]
    if not shapes:
        return None
    cell, colour, shape = (Counter(values).most_common(1)[0][0] for values in zip(*shapes))
    return Scene(cell, len(shapes), colour, shape)


def score_attributes(predicted: Scene | None, expected: Scene) -> dict[str, bool]:
    """Which attributes of expected the prediction got right (no scene gets none right), and all."""
    right = {"colour": predicted is not None and predicted.colour == expected.colour,
             "shape": predicted is not None and predicted.shape == expected.shape,
             "count": predicted is not None and predicted.count == expected.count,
             "position": predicted is not None and predicted.cell == expected.cell}
    return {**right, "all": all(right.values())}
