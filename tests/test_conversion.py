"""tools/checkpoint/convert.py: training checkpoint <-> safetensors release and a torchvision
ResNet-50 into the image encoder, checked against DCP's own reader and the training init."""

import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_m6.config import parse_args
from megatron_m6.conversion import ConversionError, checkpoint_to_release, release_to_checkpoint, resnet_to_checkpoint
from megatron_m6.inference import load_model
from megatron_m6.model.resnet import ResNetFeatures
from megatron_m6.pretrain import run, setup
from megatron_m6.training.checkpoint import CheckpointError
from tests.parallel_harness import TINY, history, run_parallel
from tests.test_checkpoint import REPO

CONVERT = os.path.join(REPO, "tools", "checkpoint", "convert.py")
TP2 = ["--tensor-model-parallel-size", "2"]


def convert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, CONVERT, *args], capture_output=True, text=True, cwd=REPO)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module")
def tp2_checkpoint(tmp_path_factory):
    """A checkpoint saved under TP2 (tensors split in chunks across two ranks' files)."""
    save = tmp_path_factory.mktemp("tp2")
    run_parallel(2, TP2 + ["--train-iters", "2", "--save", str(save)], fn=history)
    return save


def test_release_holds_the_checkpoint_weights_in_shards(tp2_checkpoint, tmp_path):
    release = tmp_path / "release"
    result = convert("to-release", "--load", str(tp2_checkpoint), "--output", str(release),
                     "--max-shard-size", "60KB",
                     "--vocab-file", os.path.join(REPO, "megatron_m6", "tokenizer", "vocab.txt"))
    assert result.returncode == 0, result.stderr
    index = json.loads((release / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    for shard in shards:  # within the limit (plus at most 8 KiB of JSON header), or one tensor too big to split
        names = [k for k, v in index["weight_map"].items() if v == shard]
        assert len(names) == 1 or (release / shard).stat().st_size <= 60 * 1024 + 8 * 1024, shard
    assert "lm_head.weight" not in index["weight_map"]  # tied: stored once, as the embedding
    assert json.loads((release / "config.json").read_text())["model_config"]["hidden_size"] == 32
    assert (release / "vocab.txt").is_file()
    same_weights(load_model(str(release)), load_model(str(tp2_checkpoint)))  # DCP's own reader


def test_a_small_release_is_one_file_in_bf16(tp2_checkpoint, tmp_path):
    checkpoint_to_release(str(tp2_checkpoint), str(tmp_path / "r"), dtype="bf16", progress=False)
    assert sorted(os.listdir(tmp_path / "r")) == ["config.json", "model.safetensors"]
    bf16, fp32 = load_model(str(tmp_path / "r")), load_model(str(tp2_checkpoint))
    for (k, a), b in zip(bf16.state_dict().items(), fp32.state_dict().values()):
        if b.is_floating_point():
            assert torch.equal(a, b.bfloat16().float()), k


def test_a_release_trains_again_under_any_layout(tp2_checkpoint, tmp_path):
    checkpoint_to_release(str(tp2_checkpoint), str(tmp_path / "r"), progress=False)
    result = convert("from-release", "--input", str(tmp_path / "r"), "--output", str(tmp_path / "c"))
    assert result.returncode == 0, result.stderr
    same_weights(load_model(str(tmp_path / "c")), load_model(str(tp2_checkpoint)))
    # Model-only: training starts at iteration 0 from these weights, under any layout. In
    # float64 (the fp32 weights load exactly), where TP2 and one process differ only by float64
    # rounding: 1e-13 is ~500 epsilon (tests/test_parallel.py measures about one).
    argv = ["--train-iters", "1", "--load", str(tmp_path / "c"), "--params-dtype", "float64"]
    one = history(argv)
    tp2 = run_parallel(2, TP2 + argv, fn=history)
    assert len(one) == 1 and abs(one[0] - tp2[0]) <= 1e-13 * abs(one[0])


def test_conversion_refuses_bad_input(tp2_checkpoint, tmp_path):
    missing = convert("to-release", "--load", str(tmp_path / "nothing"), "--output", str(tmp_path / "r"))
    assert missing.returncode == 1 and missing.stderr.startswith("error:") and "Traceback" not in missing.stderr
    (tmp_path / "taken").mkdir()
    with pytest.raises(ConversionError, match="already exists"):
        checkpoint_to_release(str(tp2_checkpoint), str(tmp_path / "taken"), progress=False)
    release = tmp_path / "r"
    checkpoint_to_release(str(tp2_checkpoint), str(release), max_shard_bytes=60_000, progress=False)
    victim = sorted(release.glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"{victim.name} .* is missing"):
        load_model(str(release))
    result = convert("from-release", "--input", str(release), "--output", str(tmp_path / "c"))
    assert result.returncode == 1 and "is missing" in result.stderr
    assert not (tmp_path / "c").exists()  # nothing half-written
    (release / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is unreadable"):
        load_model(str(release))


RESNET50_FLAGS = TINY + ["--resnet-layers", "3,4,6,3", "--resnet-width", "64", "--seed", "5"]


def torchvision_resnet50(path, basic: bool = False) -> dict[str, torch.Tensor]:
    """A state dict in torchvision's ResNet-50 format: its names and shapes (the layout test in
    test_model checks them against torchvision's parameter count), random values, a classifier."""
    g = torch.Generator().manual_seed(3)
    trunk = ResNetFeatures((3, 4, 6, 3), bottleneck=not basic, width=64).state_dict()
    state = {k: (torch.randn(v.shape, generator=g) if v.is_floating_point() else torch.full_like(v, 7))
             for k, v in trunk.items()}
    state.update({"fc.weight": torch.randn(1000, 2048), "fc.bias": torch.randn(1000)})
    torch.save(state, path)
    return state


def test_a_torchvision_resnet50_becomes_the_image_encoder(tmp_path):
    resnet = torchvision_resnet50(tmp_path / "resnet50.pth")
    result = convert("resnet", "--input", str(tmp_path / "resnet50.pth"), "--output", str(tmp_path / "c"),
                     "--", *RESNET50_FLAGS, "--mock-data")
    assert result.returncode == 0, result.stderr
    converted = load_model(str(tmp_path / "c")).state_dict()
    cfg = parse_args(RESNET50_FLAGS)
    fresh, _ = setup(cfg, log=lambda line: None)  # what pretrain draws with the same flags
    for k, v in fresh.model.state_dict().items():
        if k.startswith("embedding.image_encoder."):
            assert torch.equal(converted[k], resnet[k.removeprefix("embedding.image_encoder.")]), k
        else:
            assert torch.equal(converted[k], v), k
    trained = run(parse_args(RESNET50_FLAGS + ["--train-iters", "1", "--load", str(tmp_path / "c")]),
                  log=lambda line: None)
    assert trained.iteration == 1 and len(trained.history) == 1


def test_a_resnet_of_another_shape_is_refused(tmp_path):
    torchvision_resnet50(tmp_path / "resnet.pth", basic=True)
    cfg = parse_args(RESNET50_FLAGS)
    with pytest.raises(ConversionError, match="does not fit the image encoder"):
        resnet_to_checkpoint(str(tmp_path / "resnet.pth"), cfg.model, 5, str(tmp_path / "c"), progress=False)
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ConversionError, match="not a readable state dict"):
        resnet_to_checkpoint(str(tmp_path / "junk.pth"), cfg.model, 5, str(tmp_path / "c"), progress=False)
    assert not (tmp_path / "c").exists()
    with pytest.raises(CheckpointError, match="config.json"):
        release_to_checkpoint(str(tmp_path), str(tmp_path / "d"), progress=False)
