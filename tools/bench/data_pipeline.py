"""Data pipeline throughput: corpus building (text MB/s, images/s) and the training data loader.

    python tools/bench/data_pipeline.py            # make bench-data

Measures, on data generated here (nothing downloaded):
- Chinese text through tools/preprocess_data.py's engine (parse, NFKC, cleaning, dedup, tokenise,
  write) with 1 and 2 workers, beside a plain-Python tokenising baseline (a character loop with a
  Python WordPiece) in this process;
- image-text pairs at 224 px (decode 640x480 JPEGs, resize, crop, re-encode) per worker, beside a
  plain Pillow baseline (full-size decode, one-step resize);
- samples/s of the training DataLoader over the resulting indexed datasets (five tasks mixed,
  seq 512, 224 px images decoded in the workers) with 1 and 2 workers;
- the readers of the other corpus formats against plain jsonl, 2 workers each, on the same rows:
  text as jsonl.gz, jsonl.zst and parquet (MB/s of the uncompressed jsonl), and image-text pairs as
  parquet with the image bytes and as a webdataset tar (images/s);
- the sharded path: one run against 2 and 4 shards of as much input each, in sequence (MB/s per
  shard), the merge's
  global deduplication, and the deduplication of 1M documents' keys (seconds, peak memory) at a
  4 GB and a 64 MB budget.

    python tools/bench/data_pipeline.py --only formats   # one part
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
import tempfile
import time
import unicodedata
from dataclasses import replace

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from megatron_m6.data.dataset import M6PretrainDataset, build_data_loader  # noqa: E402
from megatron_m6.data.preprocess import PreprocessConfig, preprocess  # noqa: E402
from megatron_m6.data.sample_data import PARAGRAPHS, make_text_corpus  # noqa: E402
from megatron_m6.tokenizer import DEFAULT_VOCAB_FILE, M6Tokenizer  # noqa: E402


def make_text(path: str, megabytes: float, seed: int = 0) -> None:
    """Distinct documents of 10-30 sentences drawn from the sample corpus, about `megabytes` of
    UTF-8 (mostly Chinese, some digits and Latin words)."""
    rng = random.Random(seed)
    pool = [s + "。" for p in PARAGRAPHS for s in p.split("。") if s] + make_text_corpus(500, seed)
    size = 0
    with open(path, "w", encoding="utf-8") as f:
        while size < megabytes * 1e6:
            doc = "".join(rng.choice(pool) for _ in range(rng.randint(10, 30)))
            line = json.dumps({"text": doc}, ensure_ascii=False) + "\n"
            f.write(line)
            size += len(line.encode())


def make_images(folder: str, n_files: int, n_lines: int, seed: int = 0) -> str:
    """n_files 640x480 JPEGs (gradients, shapes, light noise) and a jsonl of n_lines pairs."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "img"), exist_ok=True)
    y, x = np.mgrid[0:480, 0:640]
    for k in range(n_files):
        base = np.stack([(x * (k + 1)) % 256, (y * 2 + k * 20) % 256, (x + y) % 256], -1)
        pixels = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
        img = Image.fromarray(pixels)
        draw = ImageDraw.Draw(img)
        for _ in range(5):
            x0, y0 = int(rng.integers(0, 560)), int(rng.integers(0, 400))
            draw.ellipse((x0, y0, x0 + 80, y0 + 80), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        img.save(os.path.join(folder, "img", f"{k}.jpg"), quality=90)
    path = os.path.join(folder, "pairs.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n_lines):
            f.write(json.dumps({"image": f"img/{i % n_files}.jpg", "text": f"第{i}张图片上有圆形"},
                               ensure_ascii=False) + "\n")
    return path


def python_tokenize(text: str, vocab: dict[str, int], unk: int) -> list[int]:
    """Baseline: M6's tokenisation as a plain Python loop over characters."""
    text = unicodedata.normalize("NFKC", text).lower()
    ids, word = [], []

    def flush() -> None:
        w = "".join(word)
        start = 0
        while start < len(w):
            end = len(w)
            while end > start:
                piece = w[start:end] if start == 0 else "##" + w[start:end]
                if piece in vocab:
                    ids.append(vocab[piece])
                    break
                end -= 1
            else:
                ids.append(unk)
                break
            start = end
        word.clear()

    for ch in text:
        if ch.isspace():
            flush()
        elif "\u4e00" <= ch <= "\u9fff" or unicodedata.category(ch).startswith("P"):
            flush()
            ids.append(vocab.get(ch, unk))
        else:
            word.append(ch)
    flush()
    return ids


def bench_text(tmp: str, megabytes: float) -> dict:
    path = os.path.join(tmp, "zh.jsonl")
    make_text(path, megabytes)
    size = os.path.getsize(path) / 1e6
    out = {"input_mb": round(size, 1)}
    for workers in (1, 2):
        start = time.perf_counter()
        stats = preprocess(PreprocessConfig(inputs=[path], output_prefix=os.path.join(tmp, f"zh{workers}"),
                                            workers=workers, progress=False))
        out[f"mb_per_s_{workers}_workers"] = round(size / (time.perf_counter() - start), 2)
        out["documents_kept"] = sum(stats.documents.values())
        out["skipped"] = dict(stats.skipped)
    # Tokenising alone, one process: M6Tokenizer.encode_batch against the plain-Python loop.
    with open(path, encoding="utf-8") as f:
        texts = [json.loads(next(f))["text"] for _ in range(2000)]
    mb = sum(len(t.encode()) for t in texts) / 1e6
    tok = M6Tokenizer.from_vocab_file(DEFAULT_VOCAB_FILE)
    start = time.perf_counter()
    tok.encode_batch(texts)
    out["mb_per_s_tokenize_only"] = round(mb / (time.perf_counter() - start), 2)
    vocab = {t: i for i, t in enumerate(open(DEFAULT_VOCAB_FILE, encoding="utf-8").read().split("\n"))}
    start = time.perf_counter()
    for text in texts:
        python_tokenize(text, vocab, vocab["[UNK]"])
    out["mb_per_s_tokenize_python_baseline"] = round(mb / (time.perf_counter() - start), 2)
    return out


def plain_image(path: str, size: int) -> bytes:
    """Baseline: decode at full size, convert, one-step resize, crop, encode."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        w, h = img.size
        s = size / min(w, h)
        img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
        left, top = (img.width - size) // 2, (img.height - size) // 2
        buf = io.BytesIO()
        img.crop((left, top, left + size, top + size)).save(buf, format="JPEG", quality=90)
        return buf.getvalue()


def bench_images(tmp: str, n: int) -> dict:
    folder = os.path.join(tmp, "images")
    src = make_images(folder, 32, n)
    out = {"images": n, "source": "640x480 JPEG", "size": 224}
    for workers in (1, 2):
        start = time.perf_counter()
        preprocess(PreprocessConfig(inputs=[src], output_prefix=os.path.join(tmp, f"pairs{workers}"),
                                    image_key="image", image_size=224, workers=workers,
                                    progress=False))
        rate = n / (time.perf_counter() - start)
        out[f"images_per_s_{workers}_workers"] = round(rate)
        out[f"images_per_s_per_worker_{workers}_workers"] = round(rate / workers)
    start = time.perf_counter()
    for i in range(200):
        plain_image(os.path.join(folder, "img", f"{i % 32}.jpg"), 224)
    out["images_per_s_plain_baseline"] = round(200 / (time.perf_counter() - start))
    return out


def bench_loader(tmp: str, batches: int) -> dict:
    tok = M6Tokenizer.from_vocab_file(DEFAULT_VOCAB_FILE)
    path = [os.path.join(tmp, "zh1_text_document"), os.path.join(tmp, "pairs1_text_image")]
    batch = 16
    ds = M6PretrainDataset(path, tok, 512, 49, 224, None, 0, batch * (batches + 2))
    out = {"seq_length": 512, "image_size": 224, "micro_batch_size": batch}
    for workers in (1, 2):
        loader = iter(build_data_loader(ds, batch, 512, tok.pad_id, 224, 0, workers))
        next(loader)  # workers started, first batch out
        start = time.perf_counter()
        for _ in range(batches):
            next(loader)
        out[f"samples_per_s_{workers}_workers"] = round(batches * batch / (time.perf_counter() - start))
        del loader
    return out


def _rate(cfg: PreprocessConfig, amount: float) -> float:
    start = time.perf_counter()
    preprocess(cfg)
    return amount / (time.perf_counter() - start)


def bench_formats(tmp: str, megabytes: float, n: int) -> dict:
    """Each format's rate over the plain jsonl's, measured here on the same rows."""
    import gzip
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    text = os.path.join(tmp, "fmt.jsonl")
    make_text(text, megabytes, seed=1)
    raw = open(text, "rb").read()
    size = len(raw) / 1e6
    with gzip.open(text + ".gz", "wb") as f:
        f.write(raw)
    with open(text + ".zst", "wb") as f:
        f.write(zstandard.ZstdCompressor().compress(raw))
    pq.write_table(pa.table({"text": [json.loads(line)["text"] for line in raw.splitlines()]}),
                   os.path.join(tmp, "fmt.parquet"))
    out = {"text_mb": round(size, 1)}
    for name, path in (("jsonl", text), ("jsonl_gz", text + ".gz"), ("jsonl_zst", text + ".zst"),
                       ("parquet", os.path.join(tmp, "fmt.parquet"))):
        cfg = PreprocessConfig(inputs=[path], output_prefix=os.path.join(tmp, f"fmt_{name}"), workers=2, progress=False)
        out[f"text_mb_per_s_{name}"] = round(_rate(cfg, size), 2)
    folder = os.path.join(tmp, "fmt_images")
    pairs = make_images(folder, 32, n, seed=1)
    rows = [json.loads(line) for line in open(pairs, encoding="utf-8")]
    images = {r["image"]: open(os.path.join(folder, r["image"]), "rb").read() for r in rows}
    pq.write_table(pa.table({"text": [r["text"] for r in rows], "image": [images[r["image"]] for r in rows]}),
                   os.path.join(tmp, "fmt_pairs.parquet"))
    with tarfile.open(os.path.join(tmp, "fmt_pairs.tar"), "w") as tar:
        for i, r in enumerate(rows):
            for name, payload in ((f"{i:06d}.jpg", images[r["image"]]), (f"{i:06d}.txt", r["text"].encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    out["images"] = n
    for name, path in (("jsonl", pairs), ("parquet", os.path.join(tmp, "fmt_pairs.parquet")),
                       ("tar", os.path.join(tmp, "fmt_pairs.tar"))):
        cfg = PreprocessConfig(inputs=[path], output_prefix=os.path.join(tmp, f"fmt_pairs_{name}"), image_key="image",
                               image_size=224, workers=2, progress=False)
        out[f"images_per_s_{name}"] = round(_rate(cfg, n))
    for kind, prefix in (("text_mb_per_s", "text"), ("images_per_s", "images")):
        base = out[f"{kind}_jsonl"]
        for key in [k for k in out if k.startswith(kind) and not k.endswith("jsonl")]:
            out[key.replace(kind, f"{prefix}_ratio")] = round(out[key] / base, 2)
    return out


def bench_sharded(tmp: str, megabytes: float) -> dict:
    """The sharded path: one run on `megabytes`, and corpora of 2 and 4 times that as 2 and 4
    shards in sequence (1 worker each: every run has as much to do), each shard's MB/s over the
    one run's, and the fixed cost of a run (on 10 kB); then the merge with its
    global deduplication (time, peak traced allocations); then the deduplication alone on 1M
    documents' synthetic keys at two memory budgets."""
    import tracemalloc

    from megatron_m6.data.global_dedup import KEY_RECORD, drop_reasons, keys_path, merge_deduplicated

    paths = {}
    for n in (1, 2, 4):  # n shards of `megabytes` each, so every run has as much to do
        paths[n] = os.path.join(tmp, f"shard{n}.jsonl")
        make_text(paths[n], n * megabytes, seed=2)
    size = os.path.getsize(paths[1]) / 1e6
    one = PreprocessConfig(inputs=[paths[1]], output_prefix=os.path.join(tmp, "one"), progress=False)
    out = {"mb_per_shard": round(size, 1), "mb_per_s_one_run": round(_rate(one, size), 2)}
    tiny = os.path.join(tmp, "tiny.jsonl")
    make_text(tiny, 0.01, seed=3)
    start = time.perf_counter()  # what every run costs besides its data: the pool, the vocabulary, the outputs
    preprocess(replace(one, inputs=[tiny], output_prefix=os.path.join(tmp, "tiny")))
    out["seconds_per_run_fixed"] = round(time.perf_counter() - start, 2)
    for n in (2, 4):
        rates, ratios = [], []
        for i in range(n):  # each shard right after a one run of its size: the machine's drift cancels
            baseline = _rate(one, size)
            cfg = replace(one, inputs=[paths[n]], output_prefix=os.path.join(tmp, f"sh{n}"), num_shards=n,
                          shard_index=i)
            start = time.perf_counter()
            stats = preprocess(cfg)
            rates.append(stats.bytes / 1e6 / (time.perf_counter() - start))
            ratios.append(rates[-1] / baseline)
        out[f"mb_per_s_per_shard_{n}_shards"] = [round(r, 2) for r in rates]
        out[f"ratio_shard_to_one_run_{n}_shards"] = [round(r, 2) for r in ratios]
    (name,) = replace(one, output_prefix=os.path.join(tmp, "sh4"), num_shards=4).output_names().values()
    shards = [name[:-len(".shard-00000-of-00004")] + f".shard-{i:05d}-of-00004" for i in range(4)]
    docs = sum(os.path.getsize(keys_path(s)) for s in shards) // KEY_RECORD.itemsize
    start = time.perf_counter()
    merge_deduplicated(shards, os.path.join(tmp, "merged"), True, True, 4 << 30)
    out["merge_documents"], out["merge_seconds"] = docs, round(time.perf_counter() - start, 2)
    # One million documents' keys, with copies and shared band keys, in 4 shards.
    rng = np.random.default_rng(0)
    n = 1_000_000
    keys = np.zeros(n, KEY_RECORD)
    keys["digest"] = np.frombuffer(rng.bytes(16 * n), "V16")
    keys["bands"] = rng.integers(1, 2**63, (n, 8), dtype=np.uint64)
    keys["sig"] = rng.integers(0, 2**16, (n, 64), dtype=np.uint16)
    later = np.flatnonzero(rng.random(n) < 0.3)[1:]
    earlier = (rng.random(len(later)) * later).astype(np.int64)
    copies = rng.random(len(later)) < 1 / 3  # 10% exact copies, 20% sharing two band keys
    keys[later[copies]] = keys[earlier[copies]]
    near, src = later[~copies], earlier[~copies]
    keys["bands"][near, :2] = keys["bands"][src, :2]
    keys["sig"][near, :48] = keys["sig"][src, :48]
    prefixes = []
    for i, part in enumerate(np.array_split(keys, 4)):
        prefixes.append(os.path.join(tmp, f"keys{i}"))
        part.tofile(keys_path(prefixes[-1]))
    for label, budget in (("4gb", 4 << 30), ("64mb", 64 << 20)):
        folder = tempfile.mkdtemp(dir=tmp)
        start = time.perf_counter()
        drop_reasons(prefixes, True, True, budget, folder)
        out[f"dedup_1m_seconds_{label}"] = round(time.perf_counter() - start, 2)
        folder = tempfile.mkdtemp(dir=tmp)
        tracemalloc.start()
        drop_reasons(prefixes, True, True, budget, folder)
        out[f"dedup_1m_peak_mb_{label}"] = round(tracemalloc.get_traced_memory()[1] / 2**20, 1)
        tracemalloc.stop()
    return out


PARTS = ("text", "images", "loader", "formats", "sharded")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--text-mb", type=float, default=20.0, help="size of the generated text corpus")
    p.add_argument("--images", type=int, default=600, help="image-text pairs to preprocess")
    p.add_argument("--batches", type=int, default=30, help="loader batches timed per setting")
    p.add_argument("--json", help="also write the numbers here")
    p.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS),
                   help="the parts to run (the loader reads what text and images build)")
    args = p.parse_args(argv)
    if "loader" in args.only and not {"text", "images"} <= set(args.only):
        p.error("--only loader needs text and images too: it reads their datasets")
    with tempfile.TemporaryDirectory() as tmp:
        results = {"cpu_cores": os.cpu_count()}
        run = {"text": lambda: bench_text(tmp, args.text_mb), "images": lambda: bench_images(tmp, args.images),
               "loader": lambda: bench_loader(tmp, args.batches),
               "formats": lambda: bench_formats(tmp, args.text_mb / 2, args.images),
               "sharded": lambda: bench_sharded(tmp, args.text_mb / 2)}
        for part in PARTS:
            if part in args.only:
                results[part] = run[part]()
    for part, numbers in results.items():
        print(part, numbers if not isinstance(numbers, dict) else
              "  ".join(f"{k}={v}" for k, v in numbers.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
