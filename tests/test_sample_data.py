import hashlib
import importlib.util
import io
import json
import os
import random
import re
import subprocess
import sys
import unicodedata
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from megatron_m6.data import sample_data
from megatron_m6.data.sample_data import (
    CELL_NAMES,
    COLOUR_JITTER,
    COLOURS,
    COUNT_WORDS,
    MANIFEST,
    SHAPES,
    cell_box,
    draw_scene,
    draw_scene_with_attributes,
    make_downstream_data,
    make_sample_data,
    make_text_corpus,
)
from megatron_m6.tokenizer import M6Tokenizer, build_vocab

CAPTION_RE = re.compile(f"^({'|'.join(CELL_NAMES)})有({'|'.join(COUNT_WORDS)})个"
                        f"({'|'.join(COLOURS)})的({'|'.join(SHAPES)})$")
_WORDS = {"position": "|".join(CELL_NAMES), "count": "|".join(COUNT_WORDS), "colour": "|".join(COLOURS),
          "shape": "|".join(SHAPES)}
# The ITM and retrieval wordings, written out here by hand: "左上角的圆形是红色的，共有两个" and
# "图中左上角画了两个圆形，颜色是红色".
DESCRIPTION_RES = [re.compile("^(?P<position>{position})的(?P<shape>{shape})是(?P<colour>{colour})的，"
                              "共有(?P<count>{count})个$".format(**_WORDS)),
                   re.compile("^图中(?P<position>{position})画了(?P<count>{count})个(?P<shape>{shape})，"
                              "颜色是(?P<colour>{colour})$".format(**_WORDS))]
REPO = Path(__file__).resolve().parents[1]


def parse_caption(caption):
    m = CAPTION_RE.match(caption)
    assert m, f"caption {caption!r} does not parse"
    return CELL_NAMES.index(m[1]), COUNT_WORDS.index(m[2]) + 1, m[3], m[4]


def blobs(mask):
    """8-connected components of a boolean mask, as lists of (y, x) pixels (flood fill)."""
    seen, found = np.zeros_like(mask), []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start], stack, pixels = True, [start], []
        while stack:
            y, x = stack.pop()
            pixels.append((y, x))
            for ny in range(max(y - 1, 0), min(y + 2, mask.shape[0])):
                for nx in range(max(x - 1, 0), min(x + 2, mask.shape[1])):
                    if mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
        found.append(pixels)
    return found


def png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def scenes(seed, n, size=96):
    rng = random.Random(seed)
    return [draw_scene(rng, size) for _ in range(n)]


def test_draw_scene_is_deterministic():
    a, b, c = scenes(1, 10), scenes(1, 10), scenes(2, 10)
    assert [t for _, t in a] == [t for _, t in b]
    assert [png_bytes(i) for i, _ in a] == [png_bytes(i) for i, _ in b]
    assert [png_bytes(i) for i, _ in a] != [png_bytes(i) for i, _ in c]
    g1, g2 = np.random.default_rng(5), np.random.default_rng(5)
    assert draw_scene(g1, 64)[1] == draw_scene(g2, 64)[1]


@pytest.mark.parametrize("size", [96, 48])
def test_image_matches_caption(size):
    for img, caption in scenes(3, 30, size):
        cell, count, colour, _ = parse_caption(caption)
        pixels = np.asarray(img, dtype=np.int16)
        assert pixels.shape == (size, size, 3)
        # Drawn without antialiasing into a lossless PNG: a pixel is white or the caption's colour
        # jittered by at most COLOUR_JITTER (+5 slack); named colours are >= 160 apart, white >= 215.
        near = (np.abs(pixels - np.array(COLOURS[colour])) <= COLOUR_JITTER + 5).all(-1)
        assert (near | (pixels == 255).all(-1)).all(), "pixels other than white and the colour"
        found = blobs(near)
        assert len(found) == count, caption
        x0, y0, x1, y1 = cell_box(cell, size)
        assert all(y0 <= y < y1 and x0 <= x < x1 for b in found for y, x in b), caption


def test_make_sample_data(tmp_path):
    summary = make_sample_data(str(tmp_path), num_train_images=20, num_test_images=5,
                               num_text_docs=50, image_size=64, seed=7, vocab_size=500)
    assert (summary["train_images"], summary["test_images"], summary["text_docs"]) == (20, 5, 50)
    assert not list(tmp_path.rglob(".*.tmp")), "temporary files left behind"
    captions = []
    for split, n in (("train", 20), ("test", 5)):
        rows = [json.loads(line) for line in (tmp_path / f"captions_{split}.jsonl").read_text("utf-8").splitlines()]
        assert len(rows) == n
        for i, row in enumerate(rows):
            assert set(row) == {"image", "text"} and row["image"] == f"images/{split}_{i:05d}.png"
            parse_caption(row["text"])
            with Image.open(tmp_path / row["image"]) as img:
                assert img.size == (64, 64) and img.mode == "RGB"
            captions.append(row["text"])
    docs = [json.loads(line) for line in (tmp_path / "text.jsonl").read_text("utf-8").splitlines()]
    assert len(docs) == 50 and all(set(d) == {"text"} and d["text"] for d in docs)
    tok = M6Tokenizer.from_vocab_file(str(tmp_path / "vocab.txt"))
    assert tok.vocab_size == summary["vocab_size"]
    for caption in captions:
        assert tok.encode(caption) == [tok.token_to_id(c) for c in caption]
    for d in docs:
        assert tok.unk_id not in tok.encode(d["text"])


def test_make_sample_data_is_deterministic(tmp_path):
    def run(name, seed):
        make_sample_data(str(tmp_path / name), 6, 2, 20, 48, seed, 300)
        return {p.relative_to(tmp_path / name): p.read_bytes() for p in (tmp_path / name).rglob("*") if p.is_file()}
    a, b, c = run("a", 0), run("b", 0), run("c", 1)
    assert a == b
    assert a[Path("captions_train.jsonl")] != c[Path("captions_train.jsonl")]
    assert a[Path("text.jsonl")] != c[Path("text.jsonl")]


def test_corpus_round_trips_through_tokenizer(tmp_path):
    docs = make_text_corpus(300, seed=0)
    assert len(set(docs)) > 200 and any(re.search("[a-z]", d, re.I) for d in docs)
    tok = build_vocab(docs, str(tmp_path / "vocab.txt"), vocab_size=1000)
    for d in docs:
        assert tok.decode(tok.encode(d)) == unicodedata.normalize("NFKC", d).lower()


def test_cli(tmp_path):
    out = subprocess.run([sys.executable, "tools/prepare_sample_data.py", "--output-dir", str(tmp_path),
                          "--num-train-images", "3", "--num-test-images", "1", "--num-text-docs", "5",
                          "--image-size", "48", "--vocab-size", "200"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "train_images=3" in out
    assert (tmp_path / "vocab.txt").is_file()


# Downstream sets. Sizes are small but large enough for the text-only guesser's bound below.
SEED = 3
SMALL = {"caption_images": (20, 5, 10), "vqa_images": (300, 20, 150), "itm_images": (30, 5, 10),
         "retrieval_images": 40, "text_generation_rows": (200, 20, 100)}
FILES = {  # file -> its keys
    **{f"caption_{s}.jsonl": {"image", "caption"} for s in ("train", "valid", "test")},
    **{f"vqa_{s}.jsonl": {"image", "question", "answer", "question_type"} for s in ("train", "valid", "test")},
    **{f"itm_{s}.jsonl": {"image", "text", "label", "changed"} for s in ("train", "valid", "test")},
    "retrieval_test.jsonl": {"image", "text"},
    **{f"text_generation_{s}.jsonl": {"source", "target"} for s in ("train", "valid", "test")},
}


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text("utf-8").splitlines()]


def scene_from_pixels(path):
    """(position, count, colour, shape) words read off an image: an independent reference for the labels."""
    with Image.open(path) as img:
        pixels = np.asarray(img.convert("RGB"), dtype=np.int16)
    ink = ~(pixels == 255).all(-1)
    colours = [c for c, rgb in COLOURS.items() if (np.abs(pixels[ink] - rgb) <= COLOUR_JITTER + 5).all()]
    assert len(colours) == 1, path
    found = blobs(ink)
    size = pixels.shape[0]
    cells = {i for i in range(9) for b in found for y, x in b
             if cell_box(i, size)[0] <= x < cell_box(i, size)[2] and cell_box(i, size)[1] <= y < cell_box(i, size)[3]}
    shapes = set()
    for b in found:
        ys, xs = zip(*b)
        fill = len(b) / ((max(ys) - min(ys) + 1) * (max(xs) - min(xs) + 1))
        # Measured at 96 px: squares fill their box, discs 0.75-0.80 of it, triangles 0.50-0.55.
        shapes.add("正方形" if fill > 0.9 else "圆形" if fill > 0.65 else "三角形")
    assert len(cells) == 1 and len(shapes) == 1, path
    return CELL_NAMES[cells.pop()], COUNT_WORDS[len(found) - 1], colours[0], shapes.pop()


def parse_description(text):
    """(wording index, (position, count, colour, shape) words) of an ITM or retrieval text."""
    found = [(i, m) for i, regex in enumerate(DESCRIPTION_RES) if (m := regex.match(text))]
    assert len(found) == 1, f"{text!r} is not in exactly one downstream wording"
    i, m = found[0]
    return i, (m["position"], m["count"], m["colour"], m["shape"])


def caption_of(words):
    position, count, colour, shape = words
    return f"{position}有{count}个{colour}的{shape}"


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """A pretraining set and, inside it, the downstream sets of the same seed."""
    root = tmp_path_factory.mktemp("sample")
    make_sample_data(str(root), 200, 50, 100, 96, SEED, vocab_size=300)
    manifest = make_downstream_data(str(root / "downstream"), SEED, 96, vocab_file=str(root / "vocab.txt"), **SMALL)
    return root, manifest


def test_draw_scene_with_attributes_agrees_with_draw_scene(tmp_path):
    a, b = random.Random(11), random.Random(11)
    for i in range(20):
        img, caption = draw_scene(a, 96)
        img2, scene = draw_scene_with_attributes(b, 96)
        assert png_bytes(img) == png_bytes(img2) and caption == scene.caption
        img.save(tmp_path / f"{i}.png")
        assert caption_of(scene_from_pixels(tmp_path / f"{i}.png")) == caption
    assert a.random() == b.random()


def test_downstream_schemas(sets):
    root, manifest = sets
    out = root / "downstream"
    assert not list(out.rglob(".*.tmp")), "temporary files left behind"
    assert set(manifest["rows"]) == set(FILES) and json.loads((out / MANIFEST).read_text("utf-8")) == manifest
    assert manifest["images"] == len(list((out / "images").glob("*.png"))) == 590
    rows = {name: read_jsonl(out / name) for name in FILES}
    for name, keys in FILES.items():
        assert len(rows[name]) == manifest["rows"][name] and all(set(r) == keys for r in rows[name]), name
    for task, per_image in (("caption", 1), ("vqa", 3), ("itm", 2)):
        for split, n in zip(("train", "valid", "test"), SMALL[f"{task}_images"]):
            images = [r["image"] for r in rows[f"{task}_{split}.jsonl"]]
            assert images == [f"images/{task}_{split}_{i:05d}.png" for i in range(n) for _ in range(per_image)]
    for split in ("train", "valid", "test"):
        vqa = rows[f"vqa_{split}.jsonl"]
        assert all(len({r["question_type"] for r in vqa[i:i + 3]}) == 3 for i in range(0, len(vqa), 3))
        assert {r["question_type"] for r in vqa} == {"count", "position", "colour", "shape"}
        itm = rows[f"itm_{split}.jsonl"]
        assert [(r["label"], r["changed"] is None) for r in itm] == [(1, True), (0, False)] * (len(itm) // 2)
    retrieval = rows["retrieval_test.jsonl"]
    assert [r["image"] for r in retrieval] == [f"images/retrieval_test_{i:05d}.png" for i in range(40)]
    assert len({r["text"] for r in retrieval}) == 40
    with Image.open(out / retrieval[0]["image"]) as img:
        assert img.size == (96, 96) and img.mode == "RGB"


def test_downstream_labels_agree_with_pixels(sets):
    out = sets[0] / "downstream"
    for row in read_jsonl(out / "caption_train.jsonl"):
        assert row["caption"] == caption_of(scene_from_pixels(out / row["image"]))
    wordings = Counter()
    for row in read_jsonl(out / "retrieval_test.jsonl"):
        wording, words = parse_description(row["text"])
        assert words == scene_from_pixels(out / row["image"]), row
        wordings[wording] += 1
    for row in read_jsonl(out / "vqa_train.jsonl")[:150]:
        position, count, colour, shape = scene_from_pixels(out / row["image"])
        expected = {"count": (f"图中有几个{shape}？", f"{count}个"), "position": (f"{colour}的图形在哪里？", position),
                    "colour": (f"图中的{shape}是什么颜色？", colour), "shape": (f"{position}的图形是什么形状？", shape)}
        assert (row["question"], row["answer"]) == expected[row["question_type"]], row
    changed = Counter()
    for pos, neg in zip(*[iter(read_jsonl(out / "itm_train.jsonl"))] * 2):
        truth = scene_from_pixels(out / pos["image"])
        (wording, words), (neg_wording, neg_words) = parse_description(pos["text"]), parse_description(neg["text"])
        assert words == truth and neg_wording == wording, (pos, neg)
        differs = [name for name, a, b in zip(("position", "count", "colour", "shape"), truth, neg_words) if a != b]
        assert differs == [neg["changed"]], neg
        changed[neg["changed"]] += 1
        wordings[wording] += 1
    assert len(changed) == 4 and len(wordings) == len(DESCRIPTION_RES), (changed, wordings)


def test_text_generation_answers_and_splits(sets):
    out = sets[0] / "downstream"
    splits = [read_jsonl(out / f"text_generation_{s}.jsonl") for s in ("train", "valid", "test")]
    sources = [r["source"] for rows in splits for r in rows]
    assert len(set(sources)) == len(sources), "a source string repeats (within or across splits)"
    checked = Counter()
    for row in (r for rows in splits for r in rows):
        assert row["target"] and row["target"] in row["source"].rsplit("。", 1)[0], row
        for kind, question, fact in (("temperature", r"(..)今天的气温是多少度？$", r"{}今天的气温是(\d+度)。"),
                                     ("price", r"(..)多少钱一份？$", r"这家店的{}卖(\d+元)一份。")):
            if m := re.search(question, row["source"]):
                assert re.findall(fact.format(m[1]), row["source"]) == [row["target"]], row
                checked[kind, row["source"].count("。") == 2] += 1
    assert len(checked) == 4 and min(checked.values()) >= 5, checked  # with and without a second fact


def test_downstream_text_has_no_unk(sets):
    root = sets[0]
    tok = M6Tokenizer.from_vocab_file(str(root / "vocab.txt"))
    texts = [str(n) for n in range(2100)]
    for name in FILES:
        for row in read_jsonl(root / "downstream" / name):
            texts += [v for k, v in row.items() if k in {"caption", "question", "answer", "text", "source", "target"}]
    assert [t for t in texts if tok.unk_id in tok.encode(t)] == []


def pixel_digests(folder):
    digests = set()
    for path in Path(folder).glob("*.png"):
        with Image.open(path) as img:
            digests.add(hashlib.sha256(np.asarray(img.convert("RGB")).tobytes()).hexdigest())
    return digests


def test_downstream_images_are_new(sets):
    root = sets[0]
    pretraining, downstream = pixel_digests(root / "images"), pixel_digests(root / "downstream" / "images")
    assert len(pretraining) == 250 and len(downstream) == 590  # no repeats within either
    assert not pretraining & downstream


def test_text_only_guesser_is_near_chance(sets):
    """The best guess from the question alone (its most common answer in train) scores near chance on test."""
    out = sets[0] / "downstream"
    answers = defaultdict(Counter)
    for row in read_jsonl(out / "vqa_train.jsonl"):
        answers[row["question"]][row["answer"]] += 1
    for question, counts in answers.items():
        if question.startswith("图中有几个"):
            assert set(counts) == {"一个", "两个", "三个"}, question
        if sum(counts.values()) >= 30:
            assert max(counts.values()) < 0.6 * sum(counts.values()), (question, counts)
    test = read_jsonl(out / "vqa_test.jsonl")
    hits = sum(answers[r["question"]].most_common(1)[0][0] == r["answer"] for r in test if r["question"] in answers)
    # Chance is about 0.26 (1/3 count, 1/9 position, 1/4 colour, 1/3 shape); 450 questions give a
    # standard error near 0.02, so 0.4 is far above chance and far below what the image allows (1.0).
    assert hits / len(test) < 0.4


TINY = {"caption_images": (2, 1, 1), "vqa_images": (2, 1, 1), "itm_images": (2, 1, 1), "retrieval_images": 3,
        "text_generation_rows": (5, 2, 2)}


def files_of(folder):
    return {p.relative_to(folder): p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}


def test_downstream_is_deterministic(tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        make_downstream_data(str(tmp_path / name), seed, 48, **TINY)
    a, b, c = (files_of(tmp_path / name) for name in "abc")
    assert a == b
    assert set(a) == set(c) and all(a[p] != c[p] for p in a if p.suffix == ".png")


def test_manifest_comes_last(tmp_path, monkeypatch):
    renamed, real_replace = [], os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (renamed.append(Path(dst).name), real_replace(src, dst)))
    make_downstream_data(str(tmp_path), 0, 48, **TINY)
    assert sorted(renamed) == sorted(p.name for p in tmp_path.rglob("*") if p.is_file()), "not all renamed in"
    assert renamed[-1] == MANIFEST

    def fail(rng):
        raise RuntimeError("simulated failure")
    monkeypatch.setattr(sample_data, "_reading_example", fail)
    with pytest.raises(RuntimeError, match="simulated"):
        make_downstream_data(str(tmp_path), 0, 48, **TINY)
    assert not (tmp_path / MANIFEST).exists(), "an incomplete rewrite kept the old manifest"


def load_cli():
    spec = importlib.util.spec_from_file_location("prepare_sample_data", REPO / "tools" / "prepare_sample_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_cli_downstream(tmp_path, capsys):
    main = load_cli()
    small = ["--num-train-images", "3", "--num-test-images", "1", "--num-text-docs", "5", "--image-size", "48",
             "--vocab-size", "200", "--caption-images", "1", "1", "1", "--vqa-images", "1", "1", "1",
             "--itm-images", "1", "1", "1", "--retrieval-images", "2", "--text-generation-rows", "3", "1", "1"]
    main(["--output-dir", str(tmp_path / "a"), "--downstream", *small])  # no vocab.txt yet: writes both
    assert (tmp_path / "a" / "vocab.txt").is_file() and (tmp_path / "a" / "downstream" / MANIFEST).is_file()
    make_sample_data(str(tmp_path / "b"), 3, 1, 5, 48, 0, 200)
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (tmp_path / "b").rglob("*") if p.is_file()}
    main(["--output-dir", str(tmp_path / "b"), "--downstream", *small])
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in before} == before, "the pretraining set changed"
    assert files_of(tmp_path / "b" / "downstream") == files_of(tmp_path / "a" / "downstream")
    build_vocab(["左上角有两个红色的圆形"], str(tmp_path / "b" / "vocab.txt"), vocab_size=200)  # an older vocab
    for argv, message in (([str(tmp_path / "b"), "--downstream"], "predates the downstream sets"),
                          ([str(tmp_path / "c"), "--vqa-images", "1", "1", "1"], "--vqa-images needs --downstream")):
        with pytest.raises(SystemExit):
            main(["--output-dir", *argv])
        assert message in capsys.readouterr().err
