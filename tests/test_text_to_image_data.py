import importlib.util
import json
import os
from itertools import combinations
from pathlib import Path

import pytest
from PIL import Image

from megatron_m6.data import sample_data
from megatron_m6.data.sample_data import (
    ALL_SCENES,
    HELD_OUT_SCENES,
    TEXT_TO_IMAGE_MANIFEST,
    TRAINING_SCENES,
    make_text_to_image_data,
    scene_from_row,
)
from megatron_m6.data.scene_detector import detect_scene

FIELDS = ("cell", "count", "colour", "shape")
FILES = {"text_to_image_train.jsonl": {"image", "caption"}, "text_to_image_valid.jsonl": {"image", "caption"},
         "text_to_image_test.jsonl": {"caption", "image", *FIELDS}}
TRAIN, VALID = 120, 12
REPO = Path(__file__).resolve().parents[1]


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text("utf-8").splitlines()]


def detect(path):
    with Image.open(path) as img:
        return detect_scene(img)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("text_to_image")
    manifest = make_text_to_image_data(str(out), seed=3, image_size=96, train_images=TRAIN, valid_images=VALID)
    return out, manifest, {name: read_jsonl(out / name) for name in FILES}


def test_held_out_scenes_leave_every_value_and_pair_to_training():
    assert sorted(map(repr, HELD_OUT_SCENES + TRAINING_SCENES)) == sorted(map(repr, ALL_SCENES))
    assert 0 < len(HELD_OUT_SCENES) < len(TRAINING_SCENES)
    for fields in [(f,) for f in FIELDS] + list(combinations(FIELDS, 2)):
        values = {tuple(getattr(s, f) for f in fields) for s in ALL_SCENES}
        assert {tuple(getattr(s, f) for f in fields) for s in TRAINING_SCENES} == values, fields
    for field in FIELDS:  # and the test set asks for every value of every attribute
        assert {getattr(s, field) for s in HELD_OUT_SCENES} == {getattr(s, field) for s in ALL_SCENES}, field


def test_files_and_manifest(written):
    out, manifest, rows = written
    assert not list(out.rglob(".*.tmp")), "temporary files left behind"
    assert json.loads((out / TEXT_TO_IMAGE_MANIFEST).read_text("utf-8")) == manifest
    assert manifest["rows"] == {name: len(r) for name, r in rows.items()}
    assert [len(rows[name]) for name in FILES] == [TRAIN, VALID, len(HELD_OUT_SCENES)]
    assert manifest["images"] == len(list((out / "images").glob("*.png"))) == TRAIN + VALID + len(HELD_OUT_SCENES)
    for name, keys in FILES.items():
        split = name.removeprefix("text_to_image_").removesuffix(".jsonl")
        assert all(set(r) == keys for r in rows[name]), name
        assert [r["image"] for r in rows[name]] == [f"images/text_to_image_{split}_{i:05d}.png"
                                                    for i in range(len(rows[name]))]


def test_test_captions_are_never_trained_on(written):
    _, _, rows = written
    test = [scene_from_row(r) for r in rows["text_to_image_test.jsonl"]]
    assert sorted(map(repr, test)) == sorted(map(repr, HELD_OUT_SCENES))
    assert all(r["caption"] == s.caption for r, s in zip(rows["text_to_image_test.jsonl"], test))
    seen = {r["caption"] for name in ("text_to_image_train.jsonl", "text_to_image_valid.jsonl") for r in rows[name]}
    assert not seen & {s.caption for s in test}
    assert seen <= {s.caption for s in TRAINING_SCENES}


def test_images_show_their_rows_scenes(written):
    out, _, rows = written
    for row in rows["text_to_image_test.jsonl"]:
        assert detect(out / row["image"]) == scene_from_row(row), row
    for row in rows["text_to_image_train.jsonl"] + rows["text_to_image_valid.jsonl"]:
        assert detect(out / row["image"]).caption == row["caption"], row


def files_of(root):
    return {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_deterministic_atomic_and_manifest_last(tmp_path, monkeypatch):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        make_text_to_image_data(str(tmp_path / name), seed, 48, train_images=4, valid_images=2)
    a, b, c = (files_of(tmp_path / name) for name in "abc")
    assert a == b and set(a) == set(c) and all(a[p] != c[p] for p in a if p.suffix == ".png")
    renamed, real_replace = [], os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (renamed.append(Path(dst).name), real_replace(src, dst)))
    make_text_to_image_data(str(tmp_path / "a"), 0, 48, train_images=4, valid_images=2)
    assert sorted(renamed) == sorted(p.name for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert renamed[-1] == TEXT_TO_IMAGE_MANIFEST

    def fail(*args):
        raise RuntimeError("simulated failure")
    monkeypatch.setattr(sample_data, "render_slotted_scene", fail)
    with pytest.raises(RuntimeError, match="simulated"):
        make_text_to_image_data(str(tmp_path / "a"), 0, 48, train_images=4, valid_images=2)
    assert not (tmp_path / "a" / TEXT_TO_IMAGE_MANIFEST).exists(), "an incomplete rewrite kept the old manifest"


@pytest.mark.parametrize("kwargs, message", [({"train_images": -1}, ">= 0"), ({"image_size": 32}, "at least 48")])
def test_bad_sizes(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_text_to_image_data(str(tmp_path), **kwargs)
    assert not list(tmp_path.rglob("*.jsonl"))


def test_cli(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("prepare_sample_data", REPO / "tools" / "prepare_sample_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    small = ["--num-train-images", "3", "--num-test-images", "1", "--num-text-docs", "5", "--image-size", "48",
             "--vocab-size", "200"]
    module.main(["--output-dir", str(tmp_path), "--text-to-image", "--text-to-image-images", "3", "2", *small])
    assert (tmp_path / "vocab.txt").is_file(), "no vocab.txt yet: the pretraining set comes first"
    summary = json.loads((tmp_path / "downstream" / TEXT_TO_IMAGE_MANIFEST).read_text("utf-8"))
    assert summary["rows"]["text_to_image_train.jsonl"] == 3 and summary["rows"]["text_to_image_valid.jsonl"] == 2
    assert not (tmp_path / "downstream" / sample_data.MANIFEST).exists(), "--downstream was not asked for"
    with pytest.raises(SystemExit):
        module.main(["--output-dir", str(tmp_path / "b"), "--text-to-image-images", "3", "2"])
    assert "--text-to-image-images needs --text-to-image" in capsys.readouterr().err
