import math

import pytest
import torch

from megatron_m6.config import parse_args
from megatron_m6.pretrain import run
from megatron_m6.training.checkpoint import CheckpointError, latest_checkpoint
from megatron_m6.training.trainer import TrainingError

TINY = ["--mock-data", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--ffn-hidden-size", "64", "--vocab-size", "128", "--seq-length", "24", "--image-size", "64",
        "--resnet-layers", "1,1,1,1", "--resnet-width", "8", "--micro-batch-size", "2",
        "--global-batch-size", "4", "--lr", "1e-3", "--lr-warmup-iters", "2", "--log-interval", "1",
        "--hidden-dropout", "0.1", "--attention-dropout", "0.1", "--no-resnet-bottleneck"]


def quiet_run(argv, lines=None):
    cfg = parse_args(TINY + argv)
    return run(cfg, log=(lines.append if lines is not None else lambda s: None))


@pytest.mark.parametrize("moe", [[], ["--num-experts", "4", "--moe-router-topk", "2"]])
def test_resume_equals_a_run_that_never_stopped(tmp_path, moe):
    straight = quiet_run(["--train-iters", "6"] + moe).history
    quiet_run(["--train-iters", "6", "--save", str(tmp_path), "--exit-interval", "3"] + moe)
    resumed = quiet_run(["--train-iters", "6", "--load", str(tmp_path)] + moe).history
    assert len(straight) == 6 and len(resumed) == 3
    assert resumed == straight[3:]  # bit for bit in fp32 on CPU


def test_log_line_has_every_field_and_loss_falls():
    lines = []
    trainer = quiet_run(["--train-iters", "30", "--log-interval", "10", "--lr", "3e-3"], lines)
    logs = [line for line in lines if line.startswith("iteration")]
    assert len(logs) == 3
    for field in ("loss", "lr", "grad norm", "tokens/s", "samples/s"):
        assert field in logs[0]
    # Deterministic data and weights: the sums go 24.18 -> 23.56; fp32 rounding moves each ~1e-6.
    assert sum(trainer.history[-5:]) < sum(trainer.history[:5])


def test_moe_aux_loss_is_logged(tmp_path):
    lines = []
    quiet_run(["--train-iters", "2", "--num-experts", "4", "--tensorboard-dir", str(tmp_path)], lines)
    assert any("moe aux" in line for line in lines)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for tag in ("loss/total", "lr", "grad_norm", "moe_aux_loss", "throughput/tokens_per_s"):
        assert tag in tags


def test_nan_loss_stops_with_the_iteration(monkeypatch):
    from megatron_m6.training import trainer as trainer_mod
    real = trainer_mod.token_losses
    calls = {"n": 0}

    def poisoned(logits, labels):
        calls["n"] += 1
        out = real(logits, labels)
        return out * math.nan if calls["n"] > 4 else out  # 2 micro-batches per iteration

    monkeypatch.setattr(trainer_mod, "token_losses", poisoned)
    with pytest.raises(TrainingError, match="at iteration 3"):
        quiet_run(["--train-iters", "5"])


def test_checkpoint_holds_everything_needed_to_resume(tmp_path):
    import torch.distributed.checkpoint as dcp

    quiet_run(["--train-iters", "2", "--save", str(tmp_path)])
    path, meta = latest_checkpoint(str(tmp_path))
    for key in ("scheduler", "iteration", "consumed_samples", "args", "model_config"):
        assert key in meta
    assert meta["iteration"] == 2 and meta["consumed_samples"] == 8
    stored = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    assert "model.layers.1.attn.qkv.weight" in stored
    assert any(k.startswith("optimizer.state.layers.1.attn.qkv.weight.exp_avg") for k in stored)
    rng = torch.load(f"{path}/rng_00000.pt", weights_only=False)
    assert {"python", "numpy", "torch"} <= rng.keys()


def test_missing_or_corrupt_checkpoints_fail_clearly(tmp_path):
    with pytest.raises(CheckpointError, match="latest_checkpointed_iteration.txt is missing"):
        latest_checkpoint(str(tmp_path))
    quiet_run(["--train-iters", "1", "--save", str(tmp_path)])
    (tmp_path / "iter_0000001" / ".metadata").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        latest_checkpoint(str(tmp_path))
    (tmp_path / "iter_0000001" / "meta.pt").unlink()
    with pytest.raises(CheckpointError, match="meta.pt is missing"):
        latest_checkpoint(str(tmp_path))


def test_loading_into_a_different_model_is_refused(tmp_path):
    quiet_run(["--train-iters", "1", "--save", str(tmp_path)])
    cfg = parse_args(TINY + ["--train-iters", "2", "--load", str(tmp_path), "--num-layers", "3"])
    with pytest.raises(CheckpointError, match="num_layers"):
        run(cfg, log=lambda s: None)


def test_resuming_with_another_kernel_backend_is_allowed(tmp_path):
    quiet_run(["--train-iters", "1", "--save", str(tmp_path), "--attention-backend", "sdpa"])
    trainer = quiet_run(["--train-iters", "2", "--load", str(tmp_path), "--attention-backend", "auto"])
    assert trainer.iteration == 2
