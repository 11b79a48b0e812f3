"""Procedural sample data, small enough that a tiny M6 learns it on a 2-core CPU in minutes.

Images are a few identical coloured shapes drawn in one cell of a 3x3 grid, captioned in Chinese
("左上角有两个红色的圆形"), so captioning is learnable but needs the image. The text corpus is
original Chinese sentences on everyday topics plus templated sentences using the same words.
make_downstream_data writes fine-tuning sets from the same world (captioning, VQA, image-text
matching and retrieval, whose texts are worded unlike the captions, reading comprehension) on
images of their own; make_text_to_image_data a text-to-image set whose test captions name scenes
held out of its training captions. Everything is deterministic from a seed.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

from megatron_m6.tokenizer import M6Tokenizer, build_vocab

CELL_NAMES = ["左上角", "上方", "右上角", "左侧", "中间", "右侧", "左下角", "下方", "右下角"]
COLOURS = {"红色": (220, 40, 40), "绿色": (40, 170, 60), "蓝色": (40, 70, 220), "黄色": (235, 200, 30)}
SHAPES = ["圆形", "正方形", "三角形"]
COUNT_WORDS = ["一", "两", "三"]  # 1, 2, 3 ("两个", not "二个")
COLOUR_JITTER = 20  # per channel, so pixels stay within 20 of the named colour
CAPTION_TEMPLATE = "{position}有{count}个{colour}的{shape}"

PARAGRAPHS = [
    # Weather and seasons.
    "今天早上下了一场小雨。空气变得很清新。路边的树叶上还挂着水珠。",
    "夏天的午后常常很热。太阳照在地上，人们都躲在树荫下。傍晚起了风，才凉快一些。",
    "冬天北方会下雪。孩子们在院子里堆雪人。大人们忙着扫门前的雪。",
    "天气预报说明天有大风。出门的时候最好多穿一件外套。",
    "春天来了，公园里的花都开了。很多人带着相机去拍照。",
    "秋天的天空又高又蓝。田里的庄稼慢慢变黄了。农民们开始准备收割。",
    # Cities.
    "这座城市靠近大海。每天清晨都有渔船出海。港口边的市场非常热闹。",
    "北京是一座历史悠久的城市。城里有许多古老的建筑。游客们喜欢在胡同里散步。",
    "上海的夜晚灯火通明。江边的高楼在夜色中闪闪发光。",
    "小城的生活节奏比较慢。人们下班后常去河边散步。街角的小店开到很晚。",
    "地铁让出行变得方便。早高峰的时候车厢里人很多。大家都安静地看着手机。",
    "这条老街上有一家书店。书店的老板是一位和气的老人。他总是推荐好看的书。",
    # Food.
    "妈妈做的饺子最好吃。饺子的馅里有白菜和猪肉。过年的时候全家人一起包饺子。",
    "早餐我喜欢喝一碗热粥。再配上一个鸡蛋和一点小菜。",
    "南方人爱吃米饭，北方人爱吃面食。不过现在大家的口味越来越接近了。",
    "这家餐馆的面条很有名。每到中午门口就排起长队。",
    "水果店里有苹果、香蕉和西瓜。夏天的西瓜又甜又多汁。",
    "做菜的时候要注意火候。火太大菜容易糊，火太小又不够香。",
    # Science.
    "地球绕着太阳转动。转一圈大约需要一年。月亮则绕着地球转动。",
    "水在零度会结成冰。加热到一百度就会沸腾。这是生活中常见的物理现象。",
    "植物通过光合作用制造养分。它们需要阳光、水和空气。",
    "计算机用二进制表示数据。每一位只有零和一两种状态。",
    "人工智能可以识别图片中的物体。它先从大量的例子中学习规律。",
    "声音在空气中传播得比光慢。所以打雷时我们先看到闪电，后听到雷声。",
    # Learning.
    "学习一门语言需要耐心。每天读一点，写一点，慢慢就会进步。",
    "图书馆是安静的地方。很多学生在这里复习功课。",
    "老师说做题之前要先读懂题目。遇到不会的地方可以多问几个为什么。",
    "他每天晚上都会写日记。日记里记录着一天中有趣的事情。",
    "学画画要先学会观察。看清楚物体的形状和颜色，再动笔去画。",
    "数学课上我们学习了三角形和圆形。正方形的四条边一样长。",
    # Daily life.
    "周末我们一家人去爬山。山顶的风景非常美丽。下山的时候大家都累了，但是很开心。",
    "小猫喜欢在阳光下睡觉。它醒来以后会伸一个长长的懒腰。",
    "朋友送给我一盆绿色的植物。我把它放在窗台上，每周浇一次水。",
    "火车站里人来人往。有人在等车，有人在和家人告别。",
    "晚饭后，爷爷喜欢下象棋。他常常一边下棋一边讲以前的故事。",
    "这个周末我打算整理房间。把不用的东西送给需要的人。",
]
CITIES = ["北京", "上海", "广州", "杭州", "成都", "西安", "南京", "武汉"]
FOODS = ["面条", "饺子", "包子", "米饭", "馄饨"]
WEATHER = ["晴", "多云", "小雨", "大风"]
SUBJECTS = ["Python", "English", "AI", "Linux"]

# Downstream sets (make_downstream_data). VQA: question type -> (question, answer), slots from Scene.words.
VQA_TEMPLATES = {
    "count": ("图中有几个{shape}？", "{count}个"),
    "position": ("{colour}的图形在哪里？", "{position}"),
    "colour": ("图中的{shape}是什么颜色？", "{colour}"),
    "shape": ("{position}的图形是什么形状？", "{shape}"),
}
# ITM and retrieval texts: descriptions in other words than CAPTION_TEMPLATE, as a downstream set's
# own annotators would write them, so matching has to transfer from pretraining's captions and
# fine-tuning has something left to learn. Slots as CAPTION_TEMPLATE's.
DESCRIPTION_TEMPLATES = [
    "{position}的{shape}是{colour}的，共有{count}个",
    "图中{position}画了{count}个{shape}，颜色是{colour}",
]
# Reading comprehension over _fact_sentence's facts: (fact, question, answer), slots from _reading_slots.
READING_TEMPLATES = [
    ("{city}今天的气温是{temp}度。", "{city}今天的气温是多少度？", "{temp}度"),
    ("这家店的{food}卖{price}元一份。", "{food}多少钱一份？", "{price}元"),
    ("这本书一共有{pages}页，我已经读了{read}页。", "这本书一共有多少页？", "{pages}页"),
    ("这本书一共有{pages}页，我已经读了{read}页。", "我已经读了多少页？", "{read}页"),
    ("他在{year}年第一次去了{city}。", "他哪一年第一次去了{city}？", "{year}年"),
    ("他在{year}年第一次去了{city}。", "他在{year}年第一次去了哪里？", "{city}"),
    ("今天是{month}月{day}日，天气{weather}。", "今天天气怎么样？", "{weather}"),
    ("今天是{month}月{day}日，天气{weather}。", "今天是几月几日？", "{month}月{day}日"),
    ("我每天花{minutes}分钟学习 {subject}。", "我每天花多少分钟学习 {subject}？", "{minutes}分钟"),
]
# Every word the downstream sets use, given to build_vocab so none becomes [UNK]: the
# templates without their slots, every slot word, and the digits alone and after a digit ("##"
# pieces), from which WordPiece spells any number.
_TEMPLATES = [CAPTION_TEMPLATE, *DESCRIPTION_TEMPLATES, *(t for pair in VQA_TEMPLATES.values() for t in pair),
              *(t for row in READING_TEMPLATES for t in row)]
DOWNSTREAM_TEXT = "\n".join([
    *(re.sub(r"\{\w+\}", " ", t) for t in _TEMPLATES),
    " ".join(CELL_NAMES + list(COLOURS) + SHAPES + COUNT_WORDS + CITIES + FOODS + WEATHER + SUBJECTS),
    " ".join(str(n) for n in range(20)),
])


def _fact_sentence(rng: random.Random) -> str:
    """A templated sentence with numbers or a little Latin text (spaced as M6Tokenizer decodes)."""
    templates = [
        lambda: f"我每天花{rng.randint(10, 90)}分钟学习 {rng.choice(SUBJECTS)}。",
        lambda: f"{rng.choice(CITIES)}今天的气温是{rng.randint(0, 35)}度。",
        lambda: f"这本书一共有{rng.randint(100, 400)}页，我已经读了{rng.randint(1, 99)}页。",
        lambda: f"他在{rng.randint(1990, 2024)}年第一次去了{rng.choice(CITIES)}。",
        lambda: f"这家店的{rng.choice(FOODS)}卖{rng.randint(5, 30)}元一份。",
        lambda: f"今天是{rng.randint(1, 12)}月{rng.randint(1, 28)}日，天气{rng.choice(WEATHER)}。",
        lambda: "M6是一个中文多模态预训练模型，它可以同时理解图片和文字。",
        lambda: "我们用 GPU 训练模型，用 CPU 做测试。",
    ]
    return rng.choice(templates)()


def _shape_sentence(rng: random.Random) -> str:
    """A templated sentence with the caption vocabulary, so text and captions share words."""
    pos, col, shape = rng.choice(CELL_NAMES), rng.choice(list(COLOURS)), rng.choice(SHAPES)
    col2, shape2 = rng.choice([c for c in COLOURS if c != col]), rng.choice([s for s in SHAPES if s != shape])
    templates = [
        f"{pos}有{rng.choice(COUNT_WORDS)}个{col}的{shape}。",
        f"图片的{pos}画着{col}的{shape}。",
        f"这个{shape}是{col}的。",
        f"{col}和{col2}是两种不同的颜色。",
        f"{shape}和{shape2}的形状不一样。",
        f"一共有{rng.choice(COUNT_WORDS)}个{shape}，它们都在{pos}。",
    ]
    return rng.choice(templates)


def make_text_corpus(num_docs: int, seed: int) -> list[str]:
    """num_docs short documents: runs of a hand-written paragraph, or 2-4 templated sentences."""
    rng = random.Random(f"{seed}:text")
    docs = []
    for _ in range(num_docs):
        kind = rng.random()
        if kind < 0.5:
            sentences = [s + "。" for s in rng.choice(PARAGRAPHS).split("。") if s]
            start = rng.randrange(len(sentences) - 1) if len(sentences) > 2 else 0
            docs.append("".join(sentences[start:]))
        else:
            make = _fact_sentence if kind < 0.7 else _shape_sentence
            docs.append("".join(make(rng) for _ in range(rng.randint(2, 4))))
    return docs


def _place(rng: random.Random, count: int, size: int, cell: tuple[int, int, int, int],
           gap: int = 2) -> list[tuple[int, int]] | None:
    """Top-left corners of count size x size boxes inside cell, at least gap pixels apart."""
    x0, y0, x1, y1 = cell
    for _ in range(50):
        boxes: list[tuple[int, int]] = []
        for _ in range(count):
            x, y = rng.randint(x0 + 1, x1 - 1 - size), rng.randint(y0 + 1, y1 - 1 - size)
            if all(abs(x - bx) >= size + gap or abs(y - by) >= size + gap for bx, by in boxes):
                boxes.append((x, y))
        if len(boxes) == count:
            return boxes
    return None


def cell_box(index: int, image_size: int) -> tuple[int, int, int, int]:
    """Pixel bounds (x0, y0, x1, y1), end exclusive, of grid cell index (row-major)."""
    row, col = divmod(index, 3)
    return (col * image_size // 3, row * image_size // 3,
            (col + 1) * image_size // 3, (row + 1) * image_size // 3)


def _check_image_size(image_size: int) -> None:
    if image_size < 48:
        raise ValueError(f"image_size must be at least 48, got {image_size}")


@dataclass(frozen=True)
class Scene:
    """What one image shows: count identical shapes of one colour inside grid cell `cell`."""
    cell: int  # row-major index into CELL_NAMES
    count: int  # 1-3
    colour: str  # a key of COLOURS
    shape: str  # one of SHAPES

    def words(self) -> dict[str, str]:
        """The Chinese word of each attribute, the slots of CAPTION_TEMPLATE and VQA_TEMPLATES."""
        return {"position": CELL_NAMES[self.cell], "count": COUNT_WORDS[self.count - 1],
                "colour": self.colour, "shape": self.shape}

    @property
    def caption(self) -> str:
        return self.describe(CAPTION_TEMPLATE)

    def describe(self, template: str) -> str:
        return template.format(**self.words())


def _jittered(rng: random.Random, colour: str) -> tuple[int, ...]:
    return tuple(min(255, max(0, c + rng.randint(-COLOUR_JITTER, COLOUR_JITTER))) for c in COLOURS[colour])


def _draw_shapes(scene: Scene, colour: tuple[int, ...], corners: Sequence[tuple[int, int]], size: int,
                 image_size: int) -> Image.Image:
    """A white image with one size x size shape of scene's kind at each top-left corner."""
    img = Image.new("RGB", (image_size, image_size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for x, y in corners:
        box = (x, y, x + size - 1, y + size - 1)
        if scene.shape == "圆形":
            draw.ellipse(box, fill=colour)
        elif scene.shape == "正方形":
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(x, y + size - 1), (x + size - 1, y + size - 1), (x + (size - 1) / 2, y)],
                         fill=colour)
    return img


def render_scene(rng: random.Random, scene: Scene, image_size: int) -> Image.Image:
    """Draw scene with rng choosing the colour's jitter, the shapes' size and their places."""
    _check_image_size(image_size)
    colour = _jittered(rng, scene.colour)
    cell = cell_box(scene.cell, image_size)
    for size in range(rng.randint(image_size // 7, image_size // 5), 2, -1):
        if corners := _place(rng, scene.count, size, cell):  # else shrink: three may not fit
            break
    else:
        raise RuntimeError(f"cannot place {scene.count} shapes in a {image_size} px image")
    return _draw_shapes(scene, colour, corners, size, image_size)


def slot_boxes(cell: int, image_size: int) -> list[tuple[int, int, int, int]]:
    """The four slots of a cell (its quarters, row-major) as (x0, y0, x1, y1), end exclusive."""
    x0, y0, x1, y1 = cell_box(cell, image_size)
    half = (x1 - x0) // 2
    return [(x0 + half * (i % 2), y0 + half * (i // 2), x0 + half * (i % 2 + 1), y0 + half * (i // 2 + 1))
            for i in range(4)]


def render_slotted_scene(rng: random.Random, scene: Scene, image_size: int) -> Image.Image:
    """Draw scene with its shapes in count of the cell's four slots, each shape 3/4 of a slot wide and
    centred in it; rng chooses the slots and the colour's jitter.

    The text-to-image set's drawing rule. Its shapes sit on a fixed lattice, as a VQ tokenizer's codes
    do: at 96 px a slot is 16 px, exactly 2 x 2 codes of an f8 tokenizer, so a shape is always the
    same four codes. Shapes in random places (render_scene) straddle codes in every way, which the
    sample tokenizer blurs: it kept the shape of 72% of them (PERFORMANCE.md).
    """
    _check_image_size(image_size)
    colour = _jittered(rng, scene.colour)
    slots = rng.sample(slot_boxes(scene.cell, image_size), scene.count)
    width = slots[0][2] - slots[0][0]
    size = width * 3 // 4
    offset = (width - size) // 2
    return _draw_shapes(scene, colour, [(x0 + offset, y0 + offset) for x0, y0, _, _ in sorted(slots)], size,
                        image_size)


def draw_scene_with_attributes(rng: random.Random | np.random.Generator,
                               image_size: int) -> tuple[Image.Image, Scene]:
    """A random scene and its image, so downstream tasks can ask about the attributes.
    A numpy Generator only seeds a random.Random, so both kinds of rng draw the same way."""
    _check_image_size(image_size)
    if isinstance(rng, np.random.Generator):
        rng = random.Random(int(rng.integers(2**63)))
    cell, count = rng.randrange(9), rng.randint(1, 3)
    scene = Scene(cell, count, rng.choice(list(COLOURS)), rng.choice(SHAPES))
    return render_scene(rng, scene, image_size), scene


def draw_scene(rng: random.Random | np.random.Generator, image_size: int) -> tuple[Image.Image, str]:
    """One captioned image: 1-3 identical shapes of one colour, all inside one grid cell."""
    img, scene = draw_scene_with_attributes(rng, image_size)
    return img, scene.caption


def _tmp_name(path: str) -> str:
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")


def _save_png(img: Image.Image, path: str) -> None:
    img.save(_tmp_name(path), format="PNG")
    os.replace(_tmp_name(path), path)


def _write_jsonl(path: str, rows: list[dict]) -> None:
    tmp = _tmp_name(path)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    os.replace(tmp, path)


def _write_images(out_dir: str, split: str, n: int, image_size: int, seed: int) -> list[dict]:
    rng = random.Random(f"{seed}:{split}")
    rows = []
    for i in range(n):
        img, caption = draw_scene(rng, image_size)
        rel = f"images/{split}_{i:05d}.png"
        _save_png(img, os.path.join(out_dir, rel))
        rows.append({"image": rel, "text": caption})
    return rows


def make_sample_data(out_dir: str, num_train_images: int = 2000, num_test_images: int = 100,
                     num_text_docs: int = 1000, image_size: int = 96, seed: int = 0,
                     vocab_size: int = 4000) -> dict:
    """Write the sample data set to out_dir and return its counts.

    Layout: images/{train,test}_NNNNN.png, captions_{train,test}.jsonl ({"image", "text"}, paths
    relative to out_dir), text.jsonl ({"text"}) and vocab.txt. Every file is written under a
    temporary name and renamed, and vocab.txt comes last, so its presence means a complete set.
    """
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    train = _write_images(out_dir, "train", num_train_images, image_size, seed)
    test = _write_images(out_dir, "test", num_test_images, image_size, seed)
    docs = make_text_corpus(num_text_docs, seed)
    _write_jsonl(os.path.join(out_dir, "captions_train.jsonl"), train)
    _write_jsonl(os.path.join(out_dir, "captions_test.jsonl"), test)
    _write_jsonl(os.path.join(out_dir, "text.jsonl"), [{"text": doc} for doc in docs])
    texts = docs + [pair["text"] for pair in train + test] + [DOWNSTREAM_TEXT]  # so downstream encodes too
    tok = build_vocab(texts, os.path.join(out_dir, "vocab.txt"), vocab_size=vocab_size)
    return {"out_dir": out_dir, "train_images": len(train), "test_images": len(test),
            "text_docs": len(docs), "vocab_size": tok.vocab_size}


# Downstream sets: new images from streams the pretraining data never draws from.
SPLITS = ("train", "valid", "test")
MANIFEST = "downstream.json"
ALL_SCENES = [Scene(cell, count, colour, shape) for cell in range(9) for count in (1, 2, 3)
              for colour in COLOURS for shape in SHAPES]
_ATTRIBUTE_VALUES = {  # ITM's attribute name -> (Scene field, its values)
    "position": ("cell", range(9)), "count": ("count", (1, 2, 3)),
    "colour": ("colour", tuple(COLOURS)), "shape": ("shape", tuple(SHAPES)),
}


def _vqa_rows(image: str, scene: Scene, rng: random.Random) -> list[dict]:
    """All question types but one, drawn at random: three questions about one image."""
    skipped, words = rng.choice(list(VQA_TEMPLATES)), scene.words()
    return [{"image": image, "question": q.format(**words), "answer": a.format(**words), "question_type": kind}
            for kind, (q, a) in VQA_TEMPLATES.items() if kind != skipped]


def _change_one_attribute(rng: random.Random, scene: Scene) -> tuple[str, Scene]:
    """scene with one attribute, drawn at random, set to another value: a hard ITM negative."""
    attribute = rng.choice(list(_ATTRIBUTE_VALUES))
    field, values = _ATTRIBUTE_VALUES[attribute]
    value = rng.choice([v for v in values if v != getattr(scene, field)])
    return attribute, replace(scene, **{field: value})


def _itm_rows(image: str, scene: Scene, rng: random.Random) -> list[dict]:
    """The true description and a hard negative in the same words for each image, so labels are
    exactly balanced and only the changed attribute tells them apart."""
    template = rng.choice(DESCRIPTION_TEMPLATES)
    changed, negative = _change_one_attribute(rng, scene)
    return [{"image": image, "text": scene.describe(template), "label": 1, "changed": None},
            {"image": image, "text": negative.describe(template), "label": 0, "changed": changed}]


def _caption_rows(image: str, scene: Scene, rng: random.Random) -> list[dict]:
    return [{"image": image, "caption": scene.caption}]


_IMAGE_TASK_ROWS = {"caption": _caption_rows, "vqa": _vqa_rows, "itm": _itm_rows}


def _downstream_rng(seed: int, task: str, split: str) -> random.Random:
    """A stream of its own per task and split; pretraining's are f"{seed}:train" and f"{seed}:test"."""
    return random.Random(f"{seed}:downstream:{task}:{split}")


def _image_task(out_dir: str, task: str, split: str, n: int, image_size: int, seed: int) -> list[dict]:
    """Draw and save n images for task's split, with their rows."""
    rng, rows = _downstream_rng(seed, task, split), []
    for i in range(n):
        img, scene = draw_scene_with_attributes(rng, image_size)
        image = f"images/{task}_{split}_{i:05d}.png"
        _save_png(img, os.path.join(out_dir, image))
        rows += _IMAGE_TASK_ROWS[task](image, scene, rng)
    return rows


def _retrieval(out_dir: str, n: int, image_size: int, seed: int) -> list[dict]:
    """n images of n different scenes, so every description names exactly one image."""
    rng, rows = _downstream_rng(seed, "retrieval", "test"), []
    for i, scene in enumerate(rng.sample(ALL_SCENES, n)):
        image = f"images/retrieval_test_{i:05d}.png"
        _save_png(render_scene(rng, scene, image_size), os.path.join(out_dir, image))
        rows.append({"image": image, "text": scene.describe(rng.choice(DESCRIPTION_TEMPLATES))})
    return rows


def _reading_slots(rng: random.Random) -> dict[str, str | int]:
    """Values for every READING_TEMPLATES slot, in _fact_sentence's ranges."""
    return {"city": rng.choice(CITIES), "temp": rng.randint(0, 35), "food": rng.choice(FOODS),
            "price": rng.randint(5, 30), "pages": rng.randint(100, 400), "read": rng.randint(1, 99),
            "year": rng.randint(1990, 2024), "month": rng.randint(1, 12), "day": rng.randint(1, 28),
            "weather": rng.choice(WEATHER), "minutes": rng.randint(10, 90), "subject": rng.choice(SUBJECTS)}


def _reading_example(rng: random.Random) -> dict:
    """A fact and a question about it; half the time a second fact of the same kind stands beside
    it when the question tells them apart, so the answer must be read, not just copied."""
    fact, question, answer = rng.choice(READING_TEMPLATES)
    slots, other = _reading_slots(rng), _reading_slots(rng)
    facts = [fact.format(**slots)]
    if rng.random() < 0.5 and question.format(**other) != question.format(**slots):
        facts.insert(rng.randrange(2), fact.format(**other))
    return {"source": "".join(facts) + question.format(**slots), "target": answer.format(**slots)}


def _text_generation(sizes: Sequence[int], seed: int) -> list[list[dict]]:
    """Rows of each split; no source string appears twice, within or across splits."""
    seen: set[str] = set()
    splits = []
    for split, n in zip(SPLITS, sizes):
        rng, rows = _downstream_rng(seed, "text_generation", split), []
        for _ in range(100 * n):
            if len(rows) == n:
                break
            row = _reading_example(rng)
            if row["source"] not in seen:
                seen.add(row["source"])
                rows.append(row)
        if len(rows) < n:
            raise ValueError(f"cannot draw {n} new distinct text-generation sources for {split}")
        splits.append(rows)
    return splits


def check_vocab_covers_downstream(vocab_file: str) -> None:
    """Raise if vocab_file turns downstream text into [UNK] (a vocab.txt older than DOWNSTREAM_TEXT)."""
    tok = M6Tokenizer.from_vocab_file(vocab_file)
    if tok.unk_id in tok.encode(DOWNSTREAM_TEXT):
        raise ValueError(f"{vocab_file} predates the downstream sets and lacks tokens they use; write the "
                         "pretraining set again (its images and texts come out byte-identical, vocab.txt gains "
                         "tokens, so ids shift: a model trained on the old vocab.txt needs the old one)")


def _check_sizes(per_split: dict[str, Sequence[int]], retrieval_images: int) -> None:
    for name, sizes in per_split.items():
        if len(sizes) != len(SPLITS) or min(sizes) < 0:
            raise ValueError(f"{name} must be three counts >= 0 (train, valid, test), got {list(sizes)}")
    if not 0 <= retrieval_images <= len(ALL_SCENES):
        raise ValueError(f"retrieval_images must be 0-{len(ALL_SCENES)} (there are no more distinct captions), "
                         f"got {retrieval_images}")


def make_downstream_data(out_dir: str, seed: int = 0, image_size: int = 96,
                         caption_images: Sequence[int] = (1000, 100, 300),
                         vqa_images: Sequence[int] = (1000, 100, 300),
                         itm_images: Sequence[int] = (1000, 100, 200),
                         retrieval_images: int = 100,
                         text_generation_rows: Sequence[int] = (2000, 100, 300),
                         vocab_file: str | None = None) -> dict:
    """Write the downstream sets to out_dir and return the manifest. Sizes are (train, valid, test).

    Files (image paths relative to out_dir): images/{task}_{split}_NNNNN.png; caption_{split}.jsonl
    {"image", "caption"}; vqa_{split}.jsonl {"image", "question", "answer", "question_type"}, three
    rows per image; itm_{split}.jsonl {"image", "text", "label", "changed"}, a positive then a hard
    negative per image, in DESCRIPTION_TEMPLATES' words; retrieval_test.jsonl {"image", "text"},
    distinct descriptions; and
    text_generation_{split}.jsonl {"source", "target"}. Every file is written under a temporary name
    and renamed, and the manifest downstream.json (the row counts) comes last, so its presence means
    a complete set. With vocab_file, check first that it encodes every downstream word.
    """
    _check_sizes({"caption_images": caption_images, "vqa_images": vqa_images, "itm_images": itm_images,
                  "text_generation_rows": text_generation_rows}, retrieval_images)
    _check_image_size(image_size)
    if vocab_file is not None:
        check_vocab_covers_downstream(vocab_file)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    manifest = _remove_manifest(out_dir, MANIFEST)
    files = {}
    for task, sizes in (("caption", caption_images), ("vqa", vqa_images), ("itm", itm_images)):
        for split, n in zip(SPLITS, sizes):
            files[f"{task}_{split}.jsonl"] = _image_task(out_dir, task, split, n, image_size, seed)
    files["retrieval_test.jsonl"] = _retrieval(out_dir, retrieval_images, image_size, seed)
    for split, rows in zip(SPLITS, _text_generation(text_generation_rows, seed)):
        files[f"text_generation_{split}.jsonl"] = rows
    images = sum(caption_images) + sum(vqa_images) + sum(itm_images) + retrieval_images
    return _write_set(manifest, seed, image_size, images, files)


def _remove_manifest(out_dir: str, name: str) -> str:
    """out_dir/name, removed if present: a rewrite is incomplete until its own manifest exists."""
    manifest = os.path.join(out_dir, name)
    if os.path.exists(manifest):
        os.remove(manifest)
    return manifest


def _write_set(manifest: str, seed: int, image_size: int, images: int, files: dict[str, list[dict]]) -> dict:
    """Write every jsonl of files beside manifest, then manifest itself (their row counts), all atomically."""
    for name, rows in files.items():
        _write_jsonl(os.path.join(os.path.dirname(manifest), name), rows)
    summary = {"seed": seed, "image_size": image_size, "images": images,
               "rows": {name: len(rows) for name, rows in files.items()}}
    with open(_tmp_name(manifest), "w", encoding="utf-8") as f:
        json.dump(summary, f, ensure_ascii=False, indent=1)
    os.replace(_tmp_name(manifest), manifest)
    return summary


# Text-to-image: the test set's captions name scenes that no training caption names, so generating
# them right takes composing attribute values seen only in other scenes, not recalling a caption.
TEXT_TO_IMAGE_MANIFEST = "text_to_image.json"


def is_held_out(scene: Scene) -> bool:
    """Whether scene is kept out of text-to-image training for its test set: one scene in six.

    Fixing any two attributes, the other two still sum to at least 5 consecutive values (count
    1-3 plus shape 0-2 is the narrowest), of which at most one is a multiple of 6: so every value
    of every attribute, and every pair of values, appears in training.
    """
    colour, shape = list(COLOURS).index(scene.colour), SHAPES.index(scene.shape)
    return (scene.cell + scene.count + colour + shape) % 6 == 0


HELD_OUT_SCENES = [scene for scene in ALL_SCENES if is_held_out(scene)]
TRAINING_SCENES = [scene for scene in ALL_SCENES if not is_held_out(scene)]


def scene_from_row(row: dict) -> Scene:
    """The scene a text_to_image_test.jsonl row asks for, to score a generated image against."""
    return Scene(row["cell"], row["count"], row["colour"], row["shape"])


def _draw_to(out_dir: str, image: str, rng: random.Random, scene: Scene, image_size: int) -> str:
    """Render scene into out_dir/image and return image, the path a row names."""
    _save_png(render_slotted_scene(rng, scene, image_size), os.path.join(out_dir, image))
    return image


def make_text_to_image_data(out_dir: str, seed: int = 0, image_size: int = 96, train_images: int = 2000,
                            valid_images: int = 100) -> dict:
    """Write the text-to-image set to out_dir and return its manifest.

    Files (image paths relative to out_dir): text_to_image_{train,valid}.jsonl {"image", "caption"},
    images of TRAINING_SCENES chosen at random, so valid measures fit; text_to_image_test.jsonl
    {"caption", "image", "cell", "count", "colour", "shape"}, each of HELD_OUT_SCENES once with a
    reference image, so test measures composition (score a generated image with scene_from_row and
    scene_detector.score_attributes); images in images/text_to_image_{split}_NNNNN.png, each drawn by
    render_slotted_scene. Every file is written under a temporary name and renamed, and the manifest
    text_to_image.json comes last.
    """
    if min(train_images, valid_images) < 0:
        raise ValueError(f"train_images and valid_images must be >= 0, got {train_images} and {valid_images}")
    _check_image_size(image_size)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    manifest = _remove_manifest(out_dir, TEXT_TO_IMAGE_MANIFEST)
    files = {}
    for split, n in (("train", train_images), ("valid", valid_images)):
        rng, rows = _downstream_rng(seed, "text_to_image", split), []
        for i in range(n):
            scene = rng.choice(TRAINING_SCENES)
            image = _draw_to(out_dir, f"images/text_to_image_{split}_{i:05d}.png", rng, scene, image_size)
            rows.append({"image": image, "caption": scene.caption})
        files[f"text_to_image_{split}.jsonl"] = rows
    rng, rows = _downstream_rng(seed, "text_to_image", "test"), []
    for i, scene in enumerate(HELD_OUT_SCENES):
        image = _draw_to(out_dir, f"images/text_to_image_test_{i:05d}.png", rng, scene, image_size)
        rows.append({"caption": scene.caption, "image": image, "cell": scene.cell, "count": scene.count,
                     "colour": scene.colour, "shape": scene.shape})
    files["text_to_image_test.jsonl"] = rows
    return _write_set(manifest, seed, image_size, train_images + valid_images + len(HELD_OUT_SCENES), files)
