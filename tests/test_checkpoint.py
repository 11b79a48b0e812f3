"""Checkpoint crash safety and integrity: background saves write the state of their own
iteration, `kill -9` at any moment leaves a loadable checkpoint, --keep-last keeps the newest
complete ones, and incomplete checkpoints fail --load with one line naming the problem."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from megatron_m6.training.checkpoint import Checkpointer, CheckpointError, latest_checkpoint, load_model_weights
from tests.test_training import quiet_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_model() -> nn.Module:
    return nn.Sequential(nn.Linear(256, 512), nn.Linear(512, 256))


def stepped(model: nn.Module) -> torch.optim.Optimizer:
    """An AdamW that has taken one step, so its state holds tensors to save."""
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 256)).sum().backward()
    opt.step()
    return opt


def test_background_save_writes_the_state_of_its_iteration(tmp_path):
    model = small_model()
    opt = stepped(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    saver = Checkpointer(str(tmp_path), async_save=True)
    saver.save(7, model, opt, {"iteration": 7})
    with torch.no_grad():  # training goes on while the checkpoint is written
        for p in model.parameters():
            p.add_(1.0)
    assert saver.wait() == 7
    path, meta = latest_checkpoint(str(tmp_path))
    assert meta["iteration"] == 7
    loaded = small_model()
    load_model_weights(path, loaded)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_keep_last_removes_older_checkpoints_and_interrupted_saves(tmp_path):
    (tmp_path / "iter_0000099.tmp").mkdir()  # left by a save that was killed
    quiet_run(["--train-iters", "4", "--save", str(tmp_path), "--save-interval", "1",
               "--keep-last", "2"])
    assert sorted(os.listdir(tmp_path)) == ["iter_0000003", "iter_0000004",
                                            "latest_checkpointed_iteration.txt"]
    assert latest_checkpoint(str(tmp_path))[1]["iteration"] == 4


def test_keep_last_never_removes_the_checkpoint_just_published(tmp_path):
    """A later iteration left by an earlier run in the same folder sorts last; the new run's
    latest checkpoint must survive it anyway."""
    quiet_run(["--train-iters", "5", "--save", str(tmp_path)])
    quiet_run(["--train-iters", "2", "--save", str(tmp_path), "--save-interval", "1", "--keep-last", "1"])
    assert sorted(os.listdir(tmp_path)) == ["iter_0000002", "latest_checkpointed_iteration.txt"]
    quiet_run(["--train-iters", "2", "--save", str(tmp_path), "--load", str(tmp_path)])  # saves 2 again
    assert latest_checkpoint(str(tmp_path))[1]["iteration"] == 2
    assert sorted(os.listdir(tmp_path)) == ["iter_0000002", "latest_checkpointed_iteration.txt"]


# The child saves forever, every weight equal to the iteration, and prints each iteration once
# its checkpoint is the latest.
CHILD = r"""
import sys, torch
sys.path.insert(0, sys.argv[3])
from tests.test_checkpoint import small_model, stepped
from megatron_m6.training.checkpoint import Checkpointer
model = small_model()
opt = stepped(model)
saver = Checkpointer(sys.argv[1], async_save=sys.argv[2] == "async", keep_last=2)
for i in range(1, 10**6):
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(i)
    saver.save(i, model, opt, {"iteration": i})
    done = saver.wait() if saver.async_save else i
    print(done, flush=True)
"""


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_kill_9_at_any_moment_leaves_the_previous_checkpoint_loadable(tmp_path, mode):
    for trial, delay in enumerate([0.0, 0.013, 0.029, 0.047, 0.071, 0.11]):
        save = tmp_path / str(trial)
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(save), mode, REPO],
                                 stdout=subprocess.PIPE, text=True, cwd=REPO)
        published = [int(child.stdout.readline()) for _ in range(2)]  # two complete ones
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        published += [int(line) for line in child.stdout.read().split()]
        child.wait()
        path, meta = latest_checkpoint(str(save))
        assert meta["iteration"] >= published[-1]
        model = small_model()
        load_model_weights(path, model)
        for name, p in model.named_parameters():
            assert torch.all(p == meta["iteration"]), f"trial {trial}: {name} is not all {meta['iteration']}"


@pytest.fixture
def saved(tmp_path):
    quiet_run(["--train-iters", "1", "--save", str(tmp_path)])
    return tmp_path / "iter_0000001"


def data_files(path) -> list:
    return sorted(p for p in path.iterdir() if p.suffix == ".distcp")


def test_a_missing_data_file_is_named(saved):
    victim = data_files(saved)[0]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"incomplete: {victim.name} is missing"):
        latest_checkpoint(str(saved.parent))


def test_a_truncated_data_file_is_named(saved):
    victim = data_files(saved)[0]
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"incomplete: {victim.name} is truncated"):
        latest_checkpoint(str(saved.parent))


def test_a_missing_rng_file_fails_the_resume(saved):
    (saved / "rng_00000.pt").unlink()
    with pytest.raises(CheckpointError, match="rng_00000.pt is missing"):
        quiet_run(["--train-iters", "2", "--load", str(saved.parent)])


def test_a_foreign_meta_file_is_refused(saved):
    torch.save(["not", "a", "meta"], saved / "meta.pt")
    with pytest.raises(CheckpointError, match="not a megatron_m6 checkpoint"):
        latest_checkpoint(str(saved.parent))


def test_a_checkpoint_lacking_a_tensor_is_refused(saved):
    """A checkpoint of the same config whose metadata lacks a tensor (a layout that never saved
    it) fails with the tensor's name, not a partial load."""
    import torch.distributed.checkpoint as dcp

    metadata = dcp.FileSystemReader(str(saved)).read_metadata()
    key = "model.layers.1.mlp.fc1.weight"
    assert key in metadata.state_dict_metadata
    del metadata.state_dict_metadata[key]
    import pickle
    with open(saved / ".metadata", "wb") as f:
        pickle.dump(metadata, f)
    with pytest.raises(CheckpointError, match="layers.1.mlp.fc1.weight"):
        quiet_run(["--train-iters", "2", "--load", str(saved.parent)])
