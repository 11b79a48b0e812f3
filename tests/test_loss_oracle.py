"""The trainer's loss and gradient scale against an oracle written here, independent of the
trainer: the masked-mean cross entropy of the model's logits over every target token of the
global batch, plus the MoE auxiliary loss averaged over the global batch's micro-batches.

The layout tests compare every layout with the trainer's own single-process run, so a scaling
error common to every layout (a loss divided twice, an aux loss summed instead of averaged)
would pass them; it fails here. In float64, so the comparison holds to rounding on any CPU, with
the tolerances of tests/test_parallel.py."""

import pytest
import torch

from megatron_m6.config import parse_args
from megatron_m6.pretrain import setup
from tests.parallel_harness import MOE, TINY, first_step, run_parallel
from tests.test_parallel import F64, assert_close

# No clipping: the gradient compared is the objective's own. Four micro-batches per step on one
# process (gradient accumulation), two per rank under DP2 and EP2, four through PP2's schedule.
ORACLE = F64 + MOE + ["--clip-grad", "0"]
LAYOUTS = {
    "accumulation": (1, []),
    "DP2": (2, []),
    "PP2": (2, ["--pipeline-model-parallel-size", "2"]),
    "EP2": (2, ["--expert-model-parallel-size", "2"]),
}


def oracle_step() -> tuple[list[float], list[dict[str, torch.Tensor]]]:
    """(the first step's loss, its gradients), from the initial weights and the global batch,
    computed by hand: the objective is sum(ce * mask) / sum(mask) over the whole global batch
    plus the mean of the micro-batches' aux losses; the loss reported is its cross-entropy part."""
    cfg = parse_args(TINY + ORACLE + ["--no-resnet-bottleneck"])
    trainer, loader = setup(cfg, log=lambda line: None)
    model = trainer.model.train()
    batches = iter(loader)
    micro = [next(batches) for _ in range(cfg.global_batch_size // cfg.micro_batch_size)]
    ce_sum, targets, aux_sum = 0.0, 0.0, 0.0
    for b in micro:
        images = b["images"].double()
        logits, aux = model(b["tokens"], b["prefix_len"], b["valid_len"], images, b["has_image"])
        logp = torch.log_softmax(logits, dim=-1)
        picked = logp.gather(-1, b["labels"][..., None]).squeeze(-1)
        ce_sum = ce_sum - (picked * b["loss_mask"]).sum()
        targets += float(b["loss_mask"].sum())
        aux_sum = aux_sum + aux
    objective = ce_sum / targets + aux_sum / len(micro)
    objective.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if name != "lm_head.weight"}
    assert all(g.abs().sum() > 0 for g in grads.values()), "every parameter takes part"
    assert float(aux_sum) > 0, "the MoE aux loss takes part"
    return [float(ce_sum) / targets], [grads]


@pytest.fixture(scope="module")
def oracle():
    return oracle_step()


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_trainer_loss_and_gradient_scale_match_the_oracle(layout, oracle):
    world, argv = LAYOUTS[layout]
    got = first_step(ORACLE + argv) if world == 1 else run_parallel(world, ORACLE + argv, fn=first_step)
    assert_close(got, oracle, f"{layout} against the oracle")


def test_a_doubled_loss_fails_the_oracle(oracle):
    """The comparison can fail: the same run with every gradient and loss doubled does."""
    losses, grads = first_step(ORACLE)
    doubled = ([2 * loss for loss in losses], [{n: 2 * g for n, g in step.items()} for step in grads])
    with pytest.raises(AssertionError, match="relative error"):
        assert_close(doubled, oracle, "doubled")
