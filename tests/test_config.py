import subprocess
import sys
from typing import get_args

import pytest

from megatron_m6.config import ConfigError, ParamsDtype, build_parser, parse_args
from megatron_m6.model_size import model_size


@pytest.mark.parametrize("argv, message", [
    (["--mock-data", "--hidden-size", "100", "--num-attention-heads", "3"], "does not divide"),
    (["--mock-data", "--preset", "m6-tiny", "--seq-length", "10"], "too short for captioning: it needs 13"),
    (["--mock-data", "--num-experts", "4", "--moe-router-topk", "5"], "must be between 1 and"),
    (["--mock-data", "--preset", "m6-base", "--hidden-size", "512"], "contradicts --preset m6-base"),
    (["--data-path", "/no/such/folder"], "does not exist"),
    ([], "--data-path"),
    (["--mock-data", "--global-batch-size", "6", "--micro-batch-size", "4"], "multiple of"),
    (["--mock-data", "--task-weights", "captioning=1,translation=2"], "unknown task"),
    (["--mock-data", "--task-weights", "captioning=2,prefix_lm=-1"], "must not be negative"),
    (["--mock-data", "--num-experts", "6", "--moe-expert-prototypes", "4", "--moe-router-topk", "4"], "must divide"),
    (["--mock-data", "--load", "/no/such/checkpoint"], "does not exist"),
    (["--mock-data", "--async-save"], "need --save"),
    (["--mock-data", "--save", "x", "--keep-last", "0"], "must be at least 1"),
    (["--mock-data", "--bf16", "--params-dtype", "float64"], "contradict each other"),
])
def test_impossible_configurations_are_rejected(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(argv)


def test_cli_prints_one_error_line_before_any_work():
    out = subprocess.run([sys.executable, "-m", "megatron_m6.pretrain", "--mock-data",
                          "--hidden-size", "100", "--num-attention-heads", "3"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: --num-attention-heads 3 does not divide --hidden-size 100"]


def test_preset_then_flags():
    cfg = parse_args(["--mock-data", "--preset", "m6-base", "--lr", "3e-4", "--moe-dropless"])
    assert cfg.model.num_layers == 24 and cfg.model.hidden_size == 1024 and cfg.lr == 3e-4
    assert parse_args(["--mock-data", "--preset", "m6-tiny", "--resnet-bottleneck"]).model.resnet_bottleneck
    assert not parse_args(["--mock-data", "--no-resnet-bottleneck"]).model.resnet_bottleneck


def test_every_flag_says_what_it_does():
    assert [a.dest for a in build_parser()._actions if not a.help] == []


def test_params_dtypes_are_the_ones_precision_maps():
    """--params-dtype's choices come from config's Literal; precision.py maps each to a dtype
    (the kernel backends need no such check: model/ reads its tuples from config's Literals)."""
    from megatron_m6.precision import PARAMS_DTYPES
    assert get_args(ParamsDtype) == tuple(PARAMS_DTYPES)


@pytest.mark.parametrize("preset, total, active", [("m6-10b", 10e9, None), ("m6-100b", 100e9, 1e9)])
def test_presets_land_on_their_parameter_counts(preset, total, active):
    size = model_size(parse_args(["--mock-data", "--preset", preset]))
    assert abs(size.total_params - total) <= 0.05 * total  # DESIGN.md: 10B and 100B, each +-5%
    if active:
        assert size.active_params < active
    # Training FLOPs per token of a dense-equivalent transformer are close to 6 x active params
    # (counted exactly on the meta device: 1.017 for m6-10b, 0.997 for m6-100b; attention scores
    # add, embedding tables never multiplied take away). A forward without its backward (1/3) or
    # a count made twice (2) falls outside.
    assert 0.8 < size.train_flops_per_token / (6 * size.active_params) < 1.3
