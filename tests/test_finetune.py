"""Fine-tuning and downstream evaluation: every layout fine-tunes like one process (float64, as
tests/test_parallel.py checks pretraining), a stopped run resumes bit for bit, fine-tuning starts
from the pretrained weights with a fresh optimizer, bad input stops before any work, and the
evaluation's scores equal an independent computation of the same quantities."""

import io
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

from megatron_m6.config import ConfigError, parse_args
from megatron_m6.conversion import checkpoint_to_release
from megatron_m6.data.downstream import DownstreamDataError, decode_image, layout, load_examples, open_examples
from megatron_m6.data.preprocess import PreprocessConfig, preprocess
from megatron_m6.data.sample_data import make_downstream_data, make_sample_data
from megatron_m6.evaluate import evaluate_task, match_scores, predict, target_log_likelihoods
from megatron_m6.finetune import build, run
from megatron_m6.inference.generate import SamplingConfig, caption_images, load_model
from megatron_m6.parallel import destroy_process_mesh
from megatron_m6.tokenizer import M6Tokenizer
from megatron_m6.training.checkpoint import CheckpointError
from tests.parallel_harness import record_steps, run_parallel
from tests.test_parallel import FLOAT64_TOLERANCE, assert_close

QUIET = lambda line: None  # noqa: E731
FT = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--ffn-hidden-size", "64",
      "--seq-length", "32", "--image-size", "64", "--resnet-layers", "1,1,1,1", "--resnet-width", "8",
      "--no-resnet-bottleneck", "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "1e-3",
      "--adam-eps", "1e-5", "--log-interval", "100"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    """A small sample set (its vocab.txt covers the downstream words) and its downstream sets."""
    out = str(tmp_path_factory.mktemp("finetune_data"))
    make_sample_data(out, num_train_images=8, num_test_images=2, num_text_docs=20, image_size=64, seed=0)
    make_downstream_data(os.path.join(out, "downstream"), seed=0, image_size=64, caption_images=(8, 4, 4),
                         vqa_images=(8, 4, 4), itm_images=(8, 4, 4), retrieval_images=6,
                         text_generation_rows=(16, 4, 4))
    return out


def task_args(data: str, task: str, *extra: str) -> list[str]:
    d = os.path.join(data, "downstream")
    return FT + ["--task", task, "--train-data", f"{d}/{task}_train.jsonl", "--valid-data", f"{d}/{task}_valid.jsonl",
                 "--vocab-file", f"{data}/vocab.txt", *extra]


@pytest.fixture(scope="module")
def pretrained(data, tmp_path_factory) -> str:
    """A float64 checkpoint to fine-tune from: two steps of text generation from random weights."""
    save = str(tmp_path_factory.mktemp("pretrained"))
    run(parse_args(task_args(data, "text_generation", "--train-iters", "2", "--params-dtype", "float64",
                             "--save", save), entry="finetune"), log=QUIET)
    return save


def finetune_steps(argv: list[str]):
    trainer, loader = build(parse_args(argv, entry="finetune"), log=QUIET)
    return record_steps(trainer, loader, steps=3)


LAYOUTS = {"DP2": ["--data-parallel-sharding", "replicate"], "TP2": ["--tensor-model-parallel-size", "2"],
           "PP2": ["--pipeline-model-parallel-size", "2"]}
SHARDED_LAYOUTS = {"TP2": LAYOUTS["TP2"], "PP2": LAYOUTS["PP2"], "FSDP2": ["--data-parallel-sharding", "full"]}


@pytest.mark.parametrize("layout_name", sorted(LAYOUTS))
def test_finetuning_under_a_layout_matches_one_process(data, pretrained, layout_name):
    """VQA from the pretrained weights, float64: losses and full gradients of 3 steps."""
    argv = task_args(data, "vqa", "--params-dtype", "float64", "--pretrained-checkpoint", pretrained)
    want = finetune_steps(argv)
    got = run_parallel(2, argv + LAYOUTS[layout_name], fn=finetune_steps)
    assert_close(got, want, f"{layout_name} fine-tuning", FLOAT64_TOLERANCE)


def validation_metrics(argv: list[str]) -> dict:
    trainer, loader = build(parse_args(argv, entry="finetune"), log=QUIET)
    trainer.train(loader)
    return trainer.last_metrics


@pytest.mark.parametrize("layout_name", sorted(SHARDED_LAYOUTS))
def test_the_validation_metric_under_a_layout_equals_one_process(data, pretrained, layout_name):
    """TP2, PP2 and FSDP2 gather a whole copy of the model for the task's metric: text
    generation's BLEU and ROUGE-L (greedy generation) and perplexity equal one process's."""
    argv = task_args(data, "text_generation", "--params-dtype", "float64", "--pretrained-checkpoint", pretrained,
                     "--train-iters", "2", "--eval-interval", "2", "--eval-iters", "1")
    want = validation_metrics(argv)
    destroy_process_mesh()
    got = run_parallel(2, argv + SHARDED_LAYOUTS[layout_name], fn=validation_metrics)
    assert set(got) == set(want) and "perplexity" in want
    for name, value in want.items():
        assert got[name] == pytest.approx(value, rel=FLOAT64_TOLERANCE["loss"]), name


def test_a_model_too_large_to_gather_falls_back_to_the_validation_loss(data, pretrained, monkeypatch):
    lines = []
    trainer, _ = build(parse_args(task_args(data, "vqa", "--pretrained-checkpoint", pretrained), entry="finetune"),
                       log=lines.append)
    monkeypatch.setattr("megatron_m6.finetune.free_memory", lambda device: 0)
    assert not trainer._whole_model_fits() and not trainer._whole_model_fits()
    assert sum("the validation loss stands in for it" in line for line in lines) == 1  # said once
    destroy_process_mesh()


def test_finetuning_starts_from_the_pretrained_weights_with_a_fresh_optimizer(data, pretrained):
    trainer, _ = build(parse_args(task_args(data, "vqa", "--params-dtype", "float64", "--pretrained-checkpoint",
                                            pretrained), entry="finetune"), log=QUIET)
    assert (trainer.iteration, trainer.consumed_samples, len(trainer.optimizer.state)) == (0, 0, 0)
    saved = load_model(pretrained).state_dict()  # fp32: the float64 weights rounded once
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value.to(saved[name].dtype), saved[name]), name
    destroy_process_mesh()


def test_resumed_finetuning_equals_an_uninterrupted_run(data, pretrained, tmp_path):
    """6 steps straight against 3, exit, resume, 3 more: the same losses bit for bit, and the same
    best checkpoint by the validation metric."""
    common = task_args(data, "itm", "--pretrained-checkpoint", pretrained, "--train-iters", "6",
                       "--eval-interval", "2", "--eval-iters", "1", "--save-best", "--save-interval", "3")
    straight = run(parse_args(common + ["--save", str(tmp_path / "a")], entry="finetune"), log=QUIET)
    resumed_dir = str(tmp_path / "b")
    run(parse_args(common + ["--save", resumed_dir, "--exit-interval", "3"], entry="finetune"), log=QUIET)
    resumed = run(parse_args(common + ["--save", resumed_dir, "--load", resumed_dir], entry="finetune"), log=QUIET)
    assert resumed.history == straight.history[3:]
    assert resumed.best == straight.best and straight.best["metric"] == "accuracy"
    assert os.path.isdir(os.path.join(resumed_dir, "best", f"iter_{straight.best['iteration']:07d}"))


@pytest.fixture(scope="module")
def release(data, pretrained, tmp_path_factory) -> str:
    """The pretrained checkpoint as a release (float64 kept, its vocab.txt shipped)."""
    out = str(tmp_path_factory.mktemp("release") / "m6")
    checkpoint_to_release(pretrained, out, vocab_file=f"{data}/vocab.txt", progress=False)
    return out


@pytest.mark.parametrize("layout_name", ["one process", *SHARDED_LAYOUTS])
def test_finetuning_from_a_release_equals_finetuning_from_its_checkpoint(data, pretrained, release, layout_name):
    """Each rank keeps its slice of the release's tensors: under TP2, PP2 and FSDP2 the run
    equals one process started from the training checkpoint (float64)."""
    argv = task_args(data, "vqa", "--params-dtype", "float64", "--pretrained-checkpoint", pretrained)
    want = finetune_steps(argv)
    destroy_process_mesh()
    argv[argv.index("--pretrained-checkpoint") + 1] = release
    if layout_name == "one process":
        got = finetune_steps(argv)
        destroy_process_mesh()
        assert got[0] == want[0] and all(torch.equal(g[k], w[k]) for g, w in zip(got[1], want[1]) for k in w)
    else:
        assert_close(run_parallel(2, argv + SHARDED_LAYOUTS[layout_name], fn=finetune_steps), want,
                     f"{layout_name} from a release", FLOAT64_TOLERANCE)


def test_a_release_of_another_vocabulary_or_shape_is_refused(data, release, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(release, other)
    tokens = (other / "vocab.txt").read_text(encoding="utf-8").splitlines()
    tokens[-1], tokens[-2] = tokens[-2], tokens[-1]
    (other / "vocab.txt").write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
    argv = task_args(data, "vqa", "--pretrained-checkpoint", str(other))
    with pytest.raises(CheckpointError, match="another vocabulary"):
        build(parse_args(argv, entry="finetune"), log=QUIET)
    destroy_process_mesh()
    argv = task_args(data, "vqa", "--pretrained-checkpoint", release)
    argv[argv.index("--hidden-size") + 1] = "48"
    with pytest.raises(CheckpointError, match="hidden_size: checkpoint 32, now 48"):
        build(parse_args(argv, entry="finetune"), log=QUIET)
    destroy_process_mesh()


def test_no_load_optim_keeps_the_position_and_starts_a_fresh_optimizer(data, pretrained, tmp_path):
    cfg = parse_args(task_args(data, "text_generation", "--params-dtype", "float64", "--load", pretrained,
                               "--no-load-optim"), entry="finetune")
    trainer, _ = build(cfg, log=QUIET)
    assert trainer.iteration == 2 and not trainer.optimizer.state


def test_a_checkpoint_of_another_vocabulary_is_refused(data, pretrained, tmp_path):
    """The same size, other ids: refused before training."""
    tokens = open(f"{data}/vocab.txt", encoding="utf-8").read().splitlines()
    tokens[-1], tokens[-2] = tokens[-2], tokens[-1]  # the same size, two ids swapped
    (tmp_path / "vocab.txt").write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
    argv = task_args(data, "text_generation", "--params-dtype", "float64", "--pretrained-checkpoint", pretrained)
    argv[argv.index("--vocab-file") + 1] = str(tmp_path / "vocab.txt")
    with pytest.raises(CheckpointError, match="another vocabulary"):
        build(parse_args(argv, entry="finetune"), log=QUIET)
    destroy_process_mesh()


def _write(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return str(path)


def test_a_task_whose_data_lacks_its_fields_is_one_error(tmp_path):
    path = _write(tmp_path / "vqa.jsonl", [{"image": "a.png", "question": "图中有几个圆形？"}])
    with pytest.raises(DownstreamDataError, match=r"vqa.jsonl:1: task vqa needs .* lacks answer"):
        load_examples(path, "vqa", 64)
    (tmp_path / "bad.jsonl").write_text('{"source": "a", "target": "b"}\n{"source": \n')
    with pytest.raises(DownstreamDataError, match=r"bad.jsonl:2: not valid json"):
        load_examples(str(tmp_path / "bad.jsonl"), "text_generation", 64)


def test_missing_images_are_skipped_up_to_the_bad_fraction(data, tmp_path):
    rows = [json.loads(line) for line in open(f"{data}/downstream/caption_train.jsonl")]
    for row in rows:
        row["image"] = os.path.join(data, "downstream", row["image"])  # absolute: the file moves
    rows[0]["image"], rows[1]["image"] = "missing/1.png", "missing/2.png"
    path = _write(tmp_path / "caption.jsonl", rows)
    examples, report = load_examples(path, "caption", 64, max_bad_fraction=0.25)
    assert len(examples) == len(rows) - 2 and report.skipped == {"image_not_found": 2}
    with pytest.raises(DownstreamDataError, match=r"2 of 8 rows have no usable image \(2 image_not_found\)"):
        load_examples(path, "caption", 64, max_bad_fraction=0.2)
    argv = task_args(data, "caption", "--max-bad-fraction", "0.1")
    argv[argv.index("--train-data") + 1] = path
    with pytest.raises(DownstreamDataError, match="more than --max-bad-fraction 0.1"):
        build(parse_args(argv, entry="finetune"), log=QUIET)  # before the model is built


@pytest.mark.parametrize("argv, message", [
    (["--task", "vqa"], "needs --train-data"),
    (["--task", "vqa", "--train-data", "/nonexistent.jsonl"], "does not exist"),
    (["--mock-data", "--epochs", "1"], "fine-tuning flag"),
])
def test_impossible_finetuning_flags_are_one_error(argv, message):
    entry = "finetune" if "--task" in argv else "pretrain"
    with pytest.raises(ConfigError, match=message):
        parse_args(FT + argv, entry=entry)


def test_the_text_only_baseline_never_sees_an_image(data):
    examples, _ = load_examples(f"{data}/downstream/vqa_train.jsonl", "vqa", 64, text_only=True)
    tok = M6Tokenizer.from_vocab_file(f"{data}/vocab.txt")
    assert all(e.image is None for e in examples)
    tokens, prefix_len = layout(examples[0], tok, 32, 4)
    assert tok.img_id not in tokens and tokens[0] == tok.cls_id
    assert tok.decode(tokens[prefix_len:-1]) == examples[0].target and tokens[-1] == tok.eos_id


# -- indexed datasets (tools/preprocess_data.py --task) -----------------------------------------
def _preprocess(inputs: list[str], prefix: str, vocab: str, **kw):
    cfg = PreprocessConfig(inputs=inputs, output_prefix=prefix, vocab_file=vocab, image_size=64, progress=False,
                           chunk_bytes=256, workers=2, **kw)  # several chunks, out of order in the pool
    return preprocess(cfg)


@pytest.fixture(scope="module")
def indexed(data, tmp_path_factory) -> dict[str, str]:
    """task -> prefix of its indexed training set, built from the jsonl the other tests read."""
    out = tmp_path_factory.mktemp("indexed")
    prefixes = {}
    for task in ("caption", "vqa", "itm", "text_generation"):
        stats = _preprocess([f"{data}/downstream/{task}_train.jsonl"], str(out / task), f"{data}/vocab.txt", task=task)
        prefixes[task] = str(out / f"{task}_{task}")
        rows = [json.loads(line) for line in open(f"{data}/downstream/{task}_train.jsonl")]
        assert dict(stats.skipped) == ({"itm_distractor": sum(r["label"] == 0 for r in rows)} if task == "itm" else {})
    return prefixes


@pytest.mark.parametrize("task", ["caption", "vqa", "itm", "text_generation"])
def test_an_indexed_dataset_holds_the_jsonl_rows(data, indexed, task):
    """Row by row, the samples (tokens, prefix, image bytes) of the indexed set equal those of the
    jsonl it was built from; itm keeps its matched pairs."""
    tok = M6Tokenizer.from_vocab_file(f"{data}/vocab.txt")
    want, _ = load_examples(f"{data}/downstream/{task}_train.jsonl", task, 64)
    want = [e for e in want if e.label in (None, 1)]
    got, summary = open_examples(indexed[task], task, tok, 64)
    assert len(got) == len(want) and summary.endswith(f"{len(want)} documents of an indexed dataset")
    for g, w in zip(got, want):
        assert layout(g, tok, 32, 4) == layout(w, tok, 32, 4)
        folded = tok.decode(tok.encode(w.target))  # what token ids give back: NFKC-folded ("，" -> ",")
        assert g.image == w.image and g.target == folded and g.references == [folded]
    assert list(got)[-1].line == len(want)  # iteration stops at the end


def test_caption_finetuning_reads_the_pretraining_pairs(data, tmp_path):
    """A caption set may be the pretraining image-text pairs, documents of [caption, image]."""
    _preprocess([f"{data}/captions_train.jsonl"], str(tmp_path / "pairs"), f"{data}/vocab.txt", image_key="image")
    tok = M6Tokenizer.from_vocab_file(f"{data}/vocab.txt")
    got, _ = open_examples(str(tmp_path / "pairs_text_image"), "caption", tok, 64)
    want, _ = load_examples(f"{data}/captions_train.jsonl", "caption", 64)
    assert [(e.source_ids, e.target_ids, e.image) for e in got] == [([], tok.encode(w.target), w.image) for w in want]


def test_finetuning_from_an_indexed_dataset_equals_finetuning_from_its_jsonl(data, pretrained, indexed):
    argv = task_args(data, "vqa", "--params-dtype", "float64", "--pretrained-checkpoint", pretrained)
    want = finetune_steps(argv)
    destroy_process_mesh()
    argv[argv.index("--train-data") + 1] = indexed["vqa"]
    argv[argv.index("--valid-data") + 1] = indexed["vqa"]
    got = finetune_steps(argv)
    destroy_process_mesh()
    assert got[0] == want[0]  # the same samples in the same order: the same losses, bit for bit
    assert all(torch.equal(g[k], w[k]) for g, w in zip(got[1], want[1]) for k in w)


def test_an_indexed_dataset_of_another_kind_is_one_error(data, indexed, tmp_path):
    tok = M6Tokenizer.from_vocab_file(f"{data}/vocab.txt")
    with pytest.raises(DownstreamDataError, match="is a text dataset; task vqa needs image-text documents"):
        open_examples(indexed["text_generation"], "vqa", tok, 64)
    _preprocess([f"{data}/text.jsonl"], str(tmp_path / "corpus"), f"{data}/vocab.txt", append_eod=True)
    with pytest.raises(DownstreamDataError, match=r"documents are \[source, target\]; this one is another kind"):
        open_examples(str(tmp_path / "corpus_text_document"), "text_generation", tok, 64)
    with pytest.raises(DownstreamDataError, match="neither a jsonl file nor an indexed dataset"):
        open_examples(str(tmp_path / "nothing"), "vqa", tok, 64)
    argv = task_args(data, "itm")
    argv[argv.index("--valid-data") + 1] = indexed["itm"]
    with pytest.raises(DownstreamDataError, match="itm accuracy needs each image's distractors"):
        build(parse_args(argv, entry="finetune"), log=QUIET)


# -- evaluation against independent computations ---------------------------------------------
@pytest.fixture(scope="module")
def model_and_tok(data, pretrained):
    """The pretrained model in float64 throughout (norms too), and its tokenizer."""
    return load_model(pretrained).double(), M6Tokenizer.from_vocab_file(f"{data}/vocab.txt")


def test_match_scores_are_the_texts_mean_log_likelihood_as_captions(data, model_and_tok):
    """Against one unpadded forward per example (a float64 model) of the caption layout, its
    log-softmax read at each target token."""
    model, tok = model_and_tok
    examples, _ = load_examples(f"{data}/downstream/itm_test.jsonl", "itm", 64)
    got = match_scores(model, tok, examples, batch_size=3, seq_length=32)
    for e, score in zip(examples, got):
        caption = tok.encode(e.target) + [tok.eos_id]
        tokens = [tok.img_id] * model.cfg.num_image_tokens + [tok.cls_id, tok.sep_id] + caption
        plen = len(tokens) - len(caption)
        with torch.no_grad():
            logits, _ = model(torch.tensor([tokens]), torch.tensor([plen]), torch.tensor([len(tokens)]),
                              decode_image(e.image, 64)[None].double(), torch.tensor([True]))
        logp = F.log_softmax(logits[0].double(), -1)
        want = sum(float(logp[plen - 1 + i, t]) for i, t in enumerate(caption)) / len(caption)
        assert score == pytest.approx(want, abs=1e-9)


def test_target_nll_is_the_validation_loss_of_training(data, pretrained):
    """The evaluation's perplexity parts against the trainer's own validation loss, on the same
    examples (the validation set once over: one micro-batch of its 4 examples)."""
    cfg = parse_args(task_args(data, "text_generation", "--params-dtype", "float64", "--pretrained-checkpoint",
                               pretrained, "--eval-iters", "1", "--micro-batch-size", "4", "--global-batch-size", "4"),
                     entry="finetune")
    trainer, _ = build(cfg, log=QUIET)
    loss = trainer.evaluate()
    destroy_process_mesh()
    sums, counts = target_log_likelihoods(trainer.model, trainer.tokenizer, trainer.examples, batch_size=3,
                                          seq_length=32)
    assert -sums.sum() / counts.sum() == pytest.approx(loss, rel=1e-12)


def test_caption_predictions_equal_generate_py_captions(data, model_and_tok):
    """On the images as loading stores them (JPEG at the model's size, as preprocessing does)."""
    model, tok = model_and_tok
    examples, _ = load_examples(f"{data}/downstream/caption_test.jsonl", "caption", 64)
    sampling = SamplingConfig(max_new_tokens=6)
    images = [Image.open(io.BytesIO(e.image)) for e in examples]
    assert predict(model, tok, examples, sampling, batch_size=3) == caption_images(model, tok, images, 64, sampling)


def _evaluate_on_ranks(argv: list[str]):
    data, pretrained = argv
    dist.init_process_group("gloo")
    model, tok = load_model(pretrained).double(), M6Tokenizer.from_vocab_file(f"{data}/vocab.txt")
    out = {}
    for task in ("vqa", "itm"):
        examples, _ = load_examples(f"{data}/downstream/{task}_test.jsonl", task, 64)
        out[task] = evaluate_task(model, tok, task, examples, SamplingConfig(max_new_tokens=4), 2,
                                  dist.get_rank(), dist.get_world_size())
    return out


def test_data_parallel_evaluation_equals_one_process(data, pretrained, model_and_tok):
    model, tok = model_and_tok
    got = run_parallel(2, [data, pretrained], fn=_evaluate_on_ranks)
    for task in ("vqa", "itm"):
        examples, _ = load_examples(f"{data}/downstream/{task}_test.jsonl", task, 64)
        want = evaluate_task(model, tok, task, examples, SamplingConfig(max_new_tokens=4), 2)
        assert got[task][0] == pytest.approx(want[0]), task
        if task == "vqa":
            assert [r["prediction"] for r in got[task][1]] == [r["prediction"] for r in want[1]]
        else:  # float64 scores of the same batches of the same examples, on one process or a share each
            assert [r["score"] for r in got[task][1]] == pytest.approx([r["score"] for r in want[1]], abs=1e-12)


def test_bf16_evaluation_tracks_fp32_within_bf16_rounding(data, pretrained, model_and_tok):
    """--dtype bf16 (weights in bf16, norms fp32) scores like fp32: its distance from float64 is
    within the fp32 distance scaled by the ratio of the two machine epsilons (2^16), as rounding
    error grows with the unit roundoff."""
    model64, tok = model_and_tok
    examples, _ = load_examples(f"{data}/downstream/vqa_valid.jsonl", "vqa", 64)
    scores = {dtype: target_log_likelihoods(model, tok, examples)[0] for dtype, model in
              ((torch.float64, model64), (torch.float32, load_model(pretrained)),
               (torch.bfloat16, load_model(pretrained, dtype=torch.bfloat16)))}
    fp32_err = abs(scores[torch.float32] - scores[torch.float64]).max()
    bf16_err = abs(scores[torch.bfloat16] - scores[torch.float64]).max()
    ratio = torch.finfo(torch.bfloat16).eps / torch.finfo(torch.float32).eps
    assert 0 < bf16_err <= ratio * fp32_err, (bf16_err, fp32_err)


def test_the_evaluate_command_writes_metrics_and_predictions(data, pretrained, tmp_path):
    d = f"{data}/downstream"
    cmd = [sys.executable, "-m", "megatron_m6.evaluate", "--task", "itm", "--load", pretrained,
           "--data", f"{d}/itm_test.jsonl", "--retrieval-data", f"{d}/retrieval_test.jsonl",
           "--vocab-file", f"{data}/vocab.txt", "--output-dir", str(tmp_path / "out")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert result["task"] == "itm" and result["examples"] == 8
    assert set(result) >= {"accuracy", "i2t_R@1", "i2t_R@5", "t2i_R@10"}
    records = [json.loads(line) for line in open(tmp_path / "out" / "predictions.jsonl")]
    rows = [json.loads(line) for line in open(f"{d}/itm_test.jsonl")]
    assert [(r["image"], r["text"], r["label"]) for r in records] == [(r["image"], r["text"], r["label"]) for r in rows]
    bad = subprocess.run(cmd[:-2] + ["--data", "/nonexistent.jsonl"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: /nonexistent.jsonl")
