"""The per-GPU memory model: exact parameter placement against counts made independently from
the module shapes, byte accounting of each sharding mode, and the launch scripts' layouts."""

import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from megatron_m6.config import PRESETS, ModelConfig
from megatron_m6.model import M6
from megatron_m6.model_size import main
from megatron_m6.parallel.memory import (
    Layout,
    RankParams,
    estimate_rank_memory,
    in_flight_micro_batches,
    layer_activation_bytes,
    layer_stage,
    rank_param_counts,
    state_bytes,
)

ROOT = Path(__file__).resolve().parent.parent


def full_count(cfg: ModelConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in M6(cfg).parameters())


def tp_split_count(cfg: ModelConfig) -> int:
    """Elements TP splits, from the architecture: qkv, proj and fc1, fc2 weights, fc1 bias, and
    the word embedding (tied head)."""
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    per_layer = 3 * h * h + 3 * h + h * h + h * f + f + f * h
    return cfg.num_layers * per_layer + cfg.vocab_size * h


def test_one_rank_holds_everything():
    cfg = tiny_config()
    assert rank_param_counts(cfg, Layout(), 0) == RankParams(full_count(cfg), 0)


def test_tensor_parallel_splits_and_replicates():
    cfg = tiny_config()
    layout = Layout(tp=2)
    ranks = [rank_param_counts(cfg, layout, 0, tp_rank=r).dense for r in range(2)]
    split = tp_split_count(cfg)
    assert sum(ranks) == split + 2 * (full_count(cfg) - split)
    # An odd vocabulary (101) is cut like torch.chunk: rank 0 holds the extra embedding row.
    assert ranks[0] - ranks[1] == cfg.hidden_size


@pytest.mark.parametrize("untie", [False, True])
def test_pipeline_stages_add_up(untie):
    cfg = tiny_config(num_layers=4, untie_embeddings_and_output_weights=untie)
    layout = Layout(pp=2)
    stages = [rank_param_counts(cfg, layout, s).dense for s in range(2)]
    tied_copy = 0 if untie else cfg.vocab_size * cfg.hidden_size
    assert sum(stages) == full_count(cfg) + tied_copy
    with torch.device("meta"):
        model = M6(cfg)
    block = sum(p.numel() for p in model.layers["0"].parameters())
    head = cfg.vocab_size * cfg.hidden_size  # the tied copy or the untied lm_head
    assert stages[1] == 2 * block + 2 * cfg.hidden_size + head


def test_interleaved_stages_are_round_robin():
    cfg = tiny_config(num_layers=8)
    layout = Layout(pp=2, num_layers_per_virtual_pipeline_stage=2)
    assert [layer_stage(i, cfg, layout) for i in range(8)] == [0, 0, 1, 1, 0, 0, 1, 1]
    plain = Layout(pp=2)
    assert rank_param_counts(cfg, layout, 1) == rank_param_counts(cfg, plain, 1)


def test_expert_parallel_halves_experts_and_ignores_tensor_parallel():
    cfg = tiny_config(num_experts=4)
    with torch.device("meta"):
        model = M6(cfg)
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    one = rank_param_counts(cfg, Layout(), 0)
    assert one == RankParams(full_count(cfg) - experts, experts)
    for tp in (1, 2):
        for tp_rank in range(tp):
            for ep_rank in range(2):
                counts = rank_param_counts(cfg, Layout(tp=tp, ep=2, dp=2), 0, tp_rank, ep_rank)
                assert counts.expert == experts // 2


def test_bytes_per_sharding_mode():
    counts = RankParams(dense=1000, expert=600)
    n = counts.total
    replicate = state_bytes(counts, Layout(dp=4, ep=2))
    assert replicate == (2 * n, 4 * n, 12 * n)
    optimizer = state_bytes(counts, Layout(dp=4, ep=2, data_parallel_sharding="optimizer"))
    assert optimizer == (2 * n, 4 * n, 12 * (1000 // 4 + 600 // 2))
    full = state_bytes(counts, Layout(dp=4, ep=2, data_parallel_sharding="full"))
    sharded = 1000 // 4 + 600 // 2
    assert full == (2 * sharded, 4 * sharded, 12 * sharded)
    assert state_bytes(counts, Layout(bf16=False)) == (4 * n, 4 * n, 8 * n)
    # A flat buffer that does not divide evenly is padded: every rank holds the ceiling.
    assert state_bytes(RankParams(10, 0), Layout(dp=4, data_parallel_sharding="full"))[0] == 2 * 3


def test_layer_activations_follow_korthikanti():
    cfg = ModelConfig(**PRESETS["m6-base"]["model"])
    s, b, h, a = 512, 2, cfg.hidden_size, cfg.num_attention_heads
    sbh = s * b * h
    scores = 5 * a * s * s * b

    def layer(**kw) -> int:
        return layer_activation_bytes(cfg, Layout(seq_length=s, micro_batch_size=b, **kw), 0)

    assert layer() == 34 * sbh + scores
    assert layer(tp=4) == (10 + 24 // 4) * sbh + scores // 4
    assert layer(tp=4, sequence_parallel=True) == (34 * sbh + scores) // 4
    assert layer(tp=4, sequence_parallel=True, recompute_granularity="selective") == 34 * sbh // 4
    assert layer(recompute_granularity="full") == 2 * sbh


def test_interleaving_keeps_more_in_flight():
    assert in_flight_micro_batches(4, 0, 1) == [4]
    assert in_flight_micro_batches(4, 3, 1) == [1]
    # Korthikanti et al.: the first stage holds L * (1 + (p - 1) / (p * m)) layers' worth.
    p, m = 4, 3
    assert sum(in_flight_micro_batches(p, 0, m)) == m * p + p - 1


def test_invalid_layouts_are_rejected():
    cfg = tiny_config()
    with pytest.raises(ValueError, match="heads"):
        rank_param_counts(cfg, Layout(tp=3), 0)
    with pytest.raises(ValueError, match="EP"):
        rank_param_counts(tiny_config(num_experts=4), Layout(ep=2, dp=1), 0)


def script_layout(script: str) -> tuple[str, Layout]:
    """The preset and default layout a launch script starts (its NAME=${NAME:-value} lines)."""
    text = (ROOT / "examples" / script).read_text()
    env = dict(re.findall(r"^(\w+)=\$\{\w+:-([^}]*)\}", text, re.M))
    nodes = int(re.search(r"^NODES=\$\{NODES:-\$\{SLURM_JOB_NUM_NODES:-(\d+)\}\}", text, re.M).group(1))
    assert f"#SBATCH --nodes={nodes}\n" in text
    preset = re.search(r"--preset (\S+)", text).group(1)
    tp, pp, ep = int(env["TP"]), int(env["PP"]), int(env["EP"])
    world = nodes * int(env["GPUS_PER_NODE"])
    layout = Layout(tp=tp, pp=pp, ep=ep, dp=world // (tp * pp),
                    sequence_parallel=env["SEQUENCE_PARALLEL"] == "1",
                    data_parallel_sharding=env["DP_SHARDING"],
                    recompute_granularity=env["RECOMPUTE"] or None,
                    micro_batch_size=int(env["MICRO_BATCH"]),
                    seq_length=PRESETS[preset]["run"]["seq_length"])
    return preset, layout


@pytest.mark.parametrize("script", ["pretrain_m6_base.sh", "pretrain_m6_10b.sh",
                                    "pretrain_m6_100b.sh"])
def test_launch_script_layouts_fit_an_80gb_gpu(script):
    preset, layout = script_layout(script)
    mem = estimate_rank_memory(ModelConfig(**PRESETS[preset]["model"]), layout)
    # 80 GB (74.5 GiB) less ~10 GiB for buffers, fragmentation and the CUDA context.
    assert mem.total < 64 * 2**30
    pasted = re.search(r"total (\S+) GiB", (ROOT / "examples" / script).read_text()).group(1)
    assert pasted == f"{mem.total / 2**30:.2f}", "re-run model_size and paste its output"


def test_model_size_prints_per_gpu_memory(capsys):
    main(["--preset", "m6-tiny", "--world-size", "2"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("m6-tiny: total parameters")
    assert "TP1 PP1 EP1 DP2, sharding replicate" in lines[3]
    assert re.fullmatch(r"m6-tiny:   params .* GiB, grads .* GiB, optimizer .* GiB, "
                        r"activations .* GiB \(estimate\), total .* GiB", lines[4])


# What the tiny model really holds per rank after one step, against the memory model's count.
ALLOCATION_LAYOUTS = [
    ("TP2 dense, replicate", 2, [], dict(tp=2, dp=1)),
    ("EP2 MoE, replicate", 2, ["--num-experts", "4", "--expert-model-parallel-size", "2"], dict(ep=2, dp=2)),
    ("TP2xDP2 MoE, optimizer", 4, ["--num-experts", "4", "--data-parallel-sharding", "optimizer"],
     dict(tp=2, dp=2, data_parallel_sharding="optimizer")),
    ("EP2xDP2 MoE, full", 4, ["--num-experts", "4", "--expert-model-parallel-size", "2",
                              "--data-parallel-sharding", "full"], dict(ep=2, dp=4, data_parallel_sharding="full")),
]


@pytest.mark.parametrize("name, world, argv, layout", ALLOCATION_LAYOUTS, ids=[a[0] for a in ALLOCATION_LAYOUTS])
def test_estimate_matches_what_each_rank_allocates(name, world, argv, layout):
    from megatron_m6.config import parse_args
    from tests.parallel_harness import TINY, allocated_bytes, run_parallel

    tp = ["--tensor-model-parallel-size", str(layout["tp"])] if layout.get("tp", 1) > 1 else []
    argv = argv + tp
    per_rank = run_parallel(world, argv, fn=allocated_bytes)
    cfg = parse_args(TINY + argv + ["--no-resnet-bottleneck"])
    estimate = estimate_rank_memory(cfg.model, Layout(bf16=False, seq_length=cfg.seq_length,
                                                      micro_batch_size=cfg.micro_batch_size, **layout))
    # The estimate is rank 0's (the largest pieces); FSDP pads each parameter's dim-0 shards,
    # where the model divides one flat buffer, so sharded modes agree to within 1%.
    tolerance = 0.01 if layout.get("data_parallel_sharding", "replicate") != "replicate" else 0.0
    for what, got in (("params", per_rank[0]["params"]), ("optimizer", per_rank[0]["optimizer"])):
        want = getattr(estimate, what)
        assert abs(got - want) <= tolerance * want, f"{name}: {what} {got} bytes allocated, {want} estimated"
