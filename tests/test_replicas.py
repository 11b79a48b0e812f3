"""Replicas really agree: after training, every rank that holds a piece of a replicated
parameter or optimizer state holds exactly the same bytes as every other rank holding that
piece, not only rank 0 (whose state the other tests gather). A rank that skipped a reduction,
reduced in another order or stepped on its own data would drift here first.

In bf16, the production precision, where rounding makes any divergence visible at once."""

from collections import defaultdict

import pytest

from tests.parallel_harness import MOE, replica_digests, run_parallel

LAYOUTS = {
    "DP2-replicate-overlap": (2, ["--data-parallel-sharding", "replicate", "--overlap-grad-reduce"]),
    "TP2xDP2-SP": (4, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    "EP2xDP2-optimizer-moe": (4, ["--expert-model-parallel-size", "2", "--data-parallel-sharding",
                                  "optimizer"] + MOE),
    "TP2xPP2xDP2-moe": (8, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                            "--num-layers", "4"] + MOE),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_replicated_parameters_and_optimizer_states_agree_on_every_rank(layout):
    world, argv = LAYOUTS[layout]
    per_rank = run_parallel(world, ["--bf16"] + argv, fn=replica_digests)
    holders = defaultdict(dict)  # piece -> {rank: digest}
    for rank, digests in enumerate(per_rank):
        for key, digest in digests.items():
            holders[key][rank] = digest
    shared = {key: ranks for key, ranks in holders.items() if len(ranks) > 1}
    assert shared, "the layout replicates something"
    assert any(state == "exp_avg" for _, state, _ in shared), "optimizer states are compared too"
    differ = {key: ranks for key, ranks in shared.items() if len(set(ranks.values())) > 1}
    assert not differ, f"{layout}: replicas differ: {sorted(differ)[:5]}"
