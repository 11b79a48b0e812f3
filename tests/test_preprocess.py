import base64
import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from megatron_m6.data.cleaning import CleaningConfig
from megatron_m6.data.downstream import load_examples
from megatron_m6.data.images import prepare_image, to_rgb
from megatron_m6.data.indexed import IndexedDataset, IndexedDatasetError, dataset_exists
from megatron_m6.data.preprocess import PreprocessConfig, format_report, preprocess
from megatron_m6.data.sample_data import make_text_corpus
from megatron_m6.tokenizer import DEFAULT_VOCAB_FILE, M6Tokenizer

REPO = Path(__file__).resolve().parents[1]
TOK = M6Tokenizer.from_vocab_file(DEFAULT_VOCAB_FILE)
DOC = "今天早上下了一场小雨。空气变得很清新。路边的树叶上还挂着水珠。孩子们在院子里堆雪人，大人们忙着扫门前的雪。"
OTHER = "秋天的天空又高又蓝。田里的庄稼慢慢变黄了。农民们开始准备收割。"


def line(obj) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode()


def run(tmp_path, inputs, **kw):
    cfg = PreprocessConfig(inputs=[str(p) for p in inputs], output_prefix=str(tmp_path / "out" / "c"),
                           progress=False, **kw)
    return preprocess(cfg), cfg


def test_text_rules_are_counted_and_bad_lines_reported(tmp_path):
    good = tmp_path / "a.jsonl"
    good.write_bytes(b"".join([
        line({"text": DOC}), line({"text": "短"}), b"{not json\n", b"\xff\xfe\n", b"\n",
        line({"body": DOC}), line([1, 2]), line({"text": DOC}),  # exact duplicate
        line({"text": DOC.replace("小雨", "大雨")}),  # near duplicate
        line({"text": "English only, written without any Chinese characters at all."}),
        line({"text": "锟斤拷" + OTHER}), line({"text": OTHER}), line({"text": 7}),
    ]))
    (tmp_path / "empty.jsonl").write_bytes(b"")
    stats, cfg = run(tmp_path, [good, tmp_path / "empty.jsonl"])
    assert dict(stats.skipped) == {"too_short": 1, "bad_json": 2, "invalid_utf8": 1,
                                   "missing_key": 2, "exact_duplicate": 1, "near_duplicate": 1,
                                   "not_chinese": 1, "garbled": 1, "empty_file": 1}
    where = {(e[0], Path(e[1]).name, e[2]) for e in stats.examples}
    assert {("bad_json", "a.jsonl", 3), ("invalid_utf8", "a.jsonl", 4), ("bad_json", "a.jsonl", 7),
            ("missing_key", "a.jsonl", 6), ("empty_file", "empty.jsonl", 0)} <= where
    ds = IndexedDataset(cfg.output_names()["text"])
    assert ds.dtype == np.uint16 and ds.num_documents == 2 and len(ds) == 2
    want = TOK.encode_batch([DOC.replace("，", ","), OTHER])
    assert [ds.document(k).tolist() for k in range(2)] == [w.tolist() for w in want]
    assert stats.lines == 13 and stats.documents[cfg.output_names()["text"]] == 2
    report = format_report(stats)
    for word in ("kept", "2 documents", "near_duplicate", "empty_file", "MB/s", "docs/s"):
        assert word in report


def test_sentences_eod_and_several_keys(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(line({"text": "今天天气很好。我们去公园吧！Hello Mr. Smith. How are you?",
                          "title": "一个关于天气的标题。"}))
    stats, cfg = run(tmp_path, [src], json_keys=["text", "title"], split_sentences=True,
                     append_eod=True)
    names = cfg.output_names()
    assert names["text"].endswith("c_text_sentence") and names["title"].endswith("c_title_sentence")
    ds = IndexedDataset(names["text"])
    assert ds.num_documents == 1 and len(ds) == 4
    sentences = [TOK.decode(ds[k].tolist()) for k in range(4)]
    assert sentences == ["今天天气很好。", "我们去公园吧!", "hello mr. smith.", "how are you?"]
    assert ds[3].tolist()[-1] == TOK.eos_id and TOK.eos_id not in ds[2].tolist()
    assert IndexedDataset(names["title"]).document(0)[-1] == TOK.eos_id


def test_output_does_not_depend_on_workers(tmp_path):
    docs = make_text_corpus(400, seed=3)
    for k in range(2):
        (tmp_path / f"part{k}.jsonl").write_bytes(b"".join(line({"text": d}) for d in docs[k::2]))
    outputs = {}
    for workers, chunk in ((1, None), (2, 3000)):
        out = tmp_path / f"w{workers}"
        stats = preprocess(PreprocessConfig(inputs=[str(tmp_path / "part*.jsonl")], output_prefix=str(out),
                                            workers=workers, chunk_bytes=chunk, progress=False,
                                            cleaning=CleaningConfig(min_chars=5)))
        outputs[workers] = [Path(f"{out}_text_document{ext}").read_bytes() for ext in (".bin", ".idx")]
        assert stats.lines == 400
    assert outputs[1] == outputs[2]
    # Partitions: separate writers merged at the end, deduplicating within each; no shard is left.
    stats = preprocess(PreprocessConfig(inputs=[str(tmp_path)], output_prefix=str(tmp_path / "p"),
                                        workers=2, partitions=2, chunk_bytes=3000, progress=False,
                                        cleaning=CleaningConfig(min_chars=5)))
    merged = IndexedDataset(str(tmp_path / "p_text_document"))
    assert merged.num_documents == stats.documents[str(tmp_path / "p_text_document")]
    assert merged.num_documents >= IndexedDataset(str(tmp_path / "w1_text_document")).num_documents
    assert not list(tmp_path.glob("p_text_document_part*"))


def image_bytes(img, fmt="PNG", **kw):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_image_text_pairs(tmp_path):
    (tmp_path / "img").mkdir()
    top_red = Image.new("RGB", (60, 30), (0, 0, 255))
    top_red.paste((255, 0, 0), (0, 0, 60, 15))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display: the red top becomes the right
    (tmp_path / "img" / "rotated.jpg").write_bytes(image_bytes(top_red, "JPEG", exif=exif))
    palette = Image.new("P", (40, 40), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.info["transparency"] = 1
    (tmp_path / "img" / "palette.png").write_bytes(image_bytes(palette, transparency=1))
    (tmp_path / "img" / "grey.png").write_bytes(image_bytes(Image.new("L", (40, 50), 128)))
    (tmp_path / "img" / "alpha.png").write_bytes(image_bytes(Image.new("RGBA", (40, 40), (0, 255, 0, 0))))
    (tmp_path / "img" / "corrupt.jpg").write_bytes(b"not an image at all")
    (tmp_path / "img" / "cut.jpg").write_bytes(
        image_bytes(Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG")[:1200])
    (tmp_path / "img" / "tiny.png").write_bytes(image_bytes(Image.new("RGB", (8, 8))))
    (tmp_path / "img" / "wide.png").write_bytes(image_bytes(Image.new("RGB", (400, 40))))
    b64 = base64.b64encode(image_bytes(Image.new("RGB", (32, 32), (9, 9, 9)))).decode()
    rows = [
        {"image": "img/rotated.jpg", "text": "旋转的图片"},
        {"image": "img/palette.png", "text": "透明的调色板"},
        {"image": "img/grey.png", "text": "灰色"},
        {"image": "img/alpha.png", "text": "透明"},
        {"image": "data:image/png;base64," + b64, "text": "内嵌"},
        {"image": b64, "text": "内嵌二"},
        {"image": "img/missing.png", "text": "没有"},
        {"image": "img/corrupt.jpg", "text": "坏的"},
        {"image": "img/cut.jpg", "text": "截断"},
        {"image": "img/tiny.png", "text": "很小"},
        {"image": "img/wide.png", "text": "很宽"},
        {"image": "data:image/png;base64,abc", "text": "坏的编码"},
        {"text": "没有图片"},
        {"image": "img/grey.png", "text": ""},
    ]
    src = tmp_path / "pairs.jsonl"
    src.write_bytes(b"".join(line(r) for r in rows) + b"{bad\n")
    stats, cfg = run(tmp_path, [src], image_key="image", image_size=32, min_image_size=16,
                     append_eod=True, max_bad_fraction=0.5)  # 4 of 15 rows have an unreadable image
    assert dict(stats.skipped) == {"image_not_found": 1, "unreadable_image": 1, "truncated_image": 1,
                                   "too_small": 1, "extreme_aspect": 1, "bad_base64": 1,
                                   "missing_key": 1, "too_short": 1, "bad_json": 1}
    ds = IndexedDataset(cfg.output_names()["text"])
    assert cfg.output_names()["text"].endswith("c_text_image")
    assert ds.multimodal and ds.dtype == np.int32 and ds.num_documents == 6 == stats.images
    assert ds.sequence_modes.tolist() == [0, 1] * 6
    assert TOK.decode(ds[0].tolist()) == "旋转的图片" and ds[0][-1] == TOK.eos_id
    pictures = [Image.open(io.BytesIO(ds.image_bytes(2 * k + 1))) for k in range(6)]
    assert all(p.format == "JPEG" and p.mode == "RGB" and p.size == (32, 32) for p in pictures)
    rotated = np.asarray(pictures[0], dtype=int)
    assert rotated[16, 28, 0] > 200 and rotated[16, 28, 2] < 60  # red on the right
    assert rotated[16, 3, 2] > 200 and rotated[16, 3, 0] < 60  # blue on the left
    assert (np.asarray(pictures[1], dtype=int) > 240).all()  # transparent palette colour -> white
    assert abs(np.asarray(pictures[2], dtype=int) - 128).max() < 8  # flat grey after JPEG quantisation
    assert (np.asarray(pictures[3], dtype=int) > 240).all()


def test_a_16_bit_greyscale_png_keeps_its_greys(tmp_path):
    """Mode I;16 (values to 65535) is scaled to 8 bits, as an independent 65535 -> 255 mapping
    says, not clipped to white."""
    grey16 = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    data = image_bytes(Image.fromarray(grey16))
    with Image.open(io.BytesIO(data)) as img:
        assert img.mode.startswith("I")  # as Pillow opens it
        rgb = np.asarray(to_rgb(img))
    want = np.rint(grey16 / 257.0).astype(np.uint8)
    assert all((rgb[..., c] == want).all() for c in range(3))
    jpeg, _ = prepare_image(data, 64, 95, 8, 3.0)
    got = np.asarray(Image.open(io.BytesIO(jpeg)).convert("L"), dtype=float)
    assert abs(got.mean() - want.mean()) < 2  # the same picture through JPEG, not white (255)


def test_a_utf8_bom_is_accepted_at_the_start_of_a_file_only(tmp_path):
    bom = b"\xef\xbb\xbf"
    src = tmp_path / "bom.jsonl"
    src.write_bytes(bom + line({"text": DOC}) + bom + line({"text": OTHER}))
    stats, cfg = run(tmp_path, [src])
    assert dict(stats.skipped) == {"bad_json": 1} and stats.examples[0][2] == 2  # the second line's BOM
    assert TOK.decode(IndexedDataset(cfg.output_names()["text"])[0].tolist()) == TOK.decode(TOK.encode(DOC))
    rows = tmp_path / "rows.jsonl"
    rows.write_bytes(bom + line({"source": "问题", "target": "答案"}))
    examples, _ = load_examples(str(rows), "text_generation", 64)
    assert [(e.source, e.target) for e in examples] == [("问题", "答案")]


def test_too_many_unreadable_images_stop_the_run_early_and_write_nothing(tmp_path):
    """A wrong image root: every image is missing. The run stops once it has read
    ROWS_BEFORE_BAD_FRACTION_STOP rows, not at the end, with one error that names the first
    path; below --max-bad-fraction (or at 1) it reports the skips and goes on."""
    src = tmp_path / "pairs.jsonl"
    src.write_bytes(b"".join(line({"image": f"elsewhere/{i}.png", "text": "图片"}) for i in range(2000)))
    with pytest.raises(ValueError, match=r"(\d+) of the first (\d+) rows have no usable image \(\d+ image_not_found\), "
                                         r"more than --max-bad-fraction 0.1; is the image root right\?.*"
                                         r"'elsewhere/0.png' in .*pairs.jsonl:1") as e:
        run(tmp_path, [src], image_key="image", image_size=32, chunk_bytes=4096)
    read = int(str(e.value).split(" of the first ")[1].split()[0])
    assert 200 <= read < 2000  # stopped early
    assert not list((tmp_path / "out").glob("*"))  # nothing written, not even temporary files
    stats, cfg = run(tmp_path, [src], image_key="image", image_size=32, max_bad_fraction=1.0)
    assert dict(stats.skipped) == {"image_not_found": 2000}
    assert IndexedDataset(cfg.output_names()["text"]).num_documents == 0  # loads, empty


def test_cli_report_and_progress(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(line({"text": DOC}) + b"{bad\n")
    out = subprocess.run([sys.executable, "tools/preprocess_data.py", "--input", str(src),
                          "--output-prefix", str(tmp_path / "o"), "--workers", "2",
                          "--tokenizer-type", "BertWordPieceLowerCase"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "kept" in out.stdout and "bad_json" in out.stdout and "MB/s" in out.stdout
    # stderr is no terminal here, as in a log file: whole lines, no bar's carriage returns
    assert "\r" not in out.stderr and f"skipped (bad_json) {src}:2: " in out.stderr.splitlines()[0]
    assert out.stderr.splitlines()[0].startswith("skipped (bad_json)")
    assert any(row.startswith("preprocess: 0.0 of 0.0 MB (100%)") and "MB/s" in row for row in out.stderr.splitlines())
    assert IndexedDataset(str(tmp_path / "o_text_document")).num_documents == 1
    bad = subprocess.run([sys.executable, "tools/preprocess_data.py", "--input", str(tmp_path / "no"),
                          "--output-prefix", str(tmp_path / "x")], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1].startswith("error: --input")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_run_leaves_nothing_that_loads(tmp_path, sig):
    src = tmp_path / "big.jsonl"
    docs = make_text_corpus(2000, seed=1)
    src.write_bytes(b"".join(line({"text": d * 20}) for d in docs) * 8)
    prefix = tmp_path / "o"
    # SIGINT as at a terminal: a shell running the suite in the background (CI, nohup) hands its
    # children SIGINT ignored, and Python then installs no KeyboardInterrupt for it.
    proc = subprocess.Popen([sys.executable, "tools/preprocess_data.py", "--input", str(src),
                             "--output-prefix", str(prefix), "--no-near-dedup", "--no-progress"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # Interrupted as soon as the output has its first bytes: no sleep whose length would have to
    # suit the machine's speed. Here the run then has ~1.9 s of its 2.1 s still to go.
    partial, deadline = Path(f"{prefix}_text_document.bin.tmp"), time.time() + 60
    while proc.poll() is None and time.time() < deadline and not (partial.exists() and partial.stat().st_size):
        time.sleep(0.01)
    assert proc.poll() is None, "preprocessing finished before it could be interrupted"
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert not dataset_exists(f"{prefix}_text_document")
    with pytest.raises(IndexedDatasetError):
        IndexedDataset(f"{prefix}_text_document")
    if sig == signal.SIGINT:  # a clean stop also removes its temporary files
        assert proc.returncode == 130 and not list(tmp_path.glob("o_*"))


def test_build_vocab_cli(tmp_path):
    (tmp_path / "c.jsonl").write_bytes(line({"text": DOC}) + b"{bad\n" + line({"text": "Hello world"}))
    out = subprocess.run([sys.executable, "tools/build_vocab.py", "--input", str(tmp_path),
                          "--output", str(tmp_path / "v.txt"), "--vocab-size", "200",
                          "--min-frequency", "1"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "skipped_lines=1" in out.stdout
    tok = M6Tokenizer.from_vocab_file(str(tmp_path / "v.txt"))
    assert tok.unk_id not in tok.encode(DOC + "hello world") and tok.encode("龘") == [tok.unk_id]


def test_shipped_vocabulary():
    """Every basic CJK character and any ASCII text encode without [UNK] and round-trip."""
    cjk = "".join(chr(c) for c in range(0x4E00, 0xA000))
    assert TOK.encode_batch([cjk])[0].tolist() == [TOK.token_to_id(c) for c in cjk]
    text = "M6是一个中文多模态预训练模型, it reads 224px images (2021)!"
    ids = TOK.encode(text)
    assert TOK.unk_id not in ids and TOK.decode(ids) == "m6是一个中文多模态预训练模型, it reads 224px images (2021)!"
    assert Path(DEFAULT_VOCAB_FILE).stat().st_size < 1 << 20
