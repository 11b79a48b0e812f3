"""Tensor (and sequence) parallelism for M6 as DTensor plans, applied from outside the model.

Megatron's split: attention qkv and MLP fc1 column-parallel, attention proj and MLP fc2
row-parallel, so each block needs one all-reduce forward and one backward; the word embedding is
split over the vocabulary and the LM head produces vocabulary-parallel logits that the loss
consumes under `loss_parallel()` without ever gathering them. With sequence parallelism the
residual stream between blocks is split along the sequence, LayerNorms run on their shard, and
the all-reduces become all-gather / reduce-scatter pairs. The image encoder, patch projections
and position/modality embeddings are replicated. MoE MLPs stay replicated over the TP group
(every TP rank routes the same tokens).
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from megatron_m6.model import m6
from megatron_m6.model.m6 import M6, MLP
from megatron_m6.parallel.dtensor import full_tensor


def apply_tensor_parallel(model: M6, tp_mesh: DeviceMesh, sequence_parallel: bool) -> None:
    """`model`: M6, or a pipeline stage of it (which may lack the embedding or the head)."""
    # Between blocks the activations are replicated, or split along the sequence with SP.
    between = Shard(1) if sequence_parallel else Replicate()
    top = {}
    if model.embedding is not None:
        top["embedding.word_emb"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
        if sequence_parallel:
            top["embedding"] = PrepareModuleOutput(output_layouts=(Replicate(), None),
                                                   desired_output_layouts=(Shard(1), None))
    if model.lm_head is not None:
        top["lm_head"] = ColwiseParallel(input_layouts=between, output_layouts=Shard(-1),
                                         use_local_output=False)
        if sequence_parallel:
            top["final_norm"] = SequenceParallel()
    parallelize_module(model, tp_mesh, top)
    if (not model.cfg.untie_embeddings_and_output_weights and model.embedding is not None
            and model.lm_head is not None):
        # Both halves of the tie are split over the vocabulary the same way: share one DTensor.
        model.lm_head.weight = model.embedding.word_emb.weight

    for block in model.layers.values():
        plan = {"attn.qkv": ColwiseParallel(),
                "attn.proj": RowwiseParallel(output_layouts=between)}
        if isinstance(block.mlp, MLP):
            plan["mlp.fc1"] = ColwiseParallel()
            plan["mlp.fc2"] = RowwiseParallel(output_layouts=between)
        if sequence_parallel:
            plan["input_norm"] = SequenceParallel()
            plan["mlp_norm"] = SequenceParallel()
            # attn(x, *, positions, ...): gather x, the one positional input.
            plan["attn"] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
            if isinstance(block.mlp, MLP):
                plan["mlp"] = PrepareModuleInput(input_layouts=(Shard(1),),
                                                 desired_input_layouts=(Replicate(),))
            else:  # MoE: route the gathered sequence as a plain tensor, keep this rank's shard
                plan["mlp"] = PrepareModuleInputOutput(
                    input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                    use_local_input=True, output_layouts=(Replicate(), None),
                    desired_output_layouts=(Shard(1), None))
        parallelize_module(block, tp_mesh, plan)


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """M6's cross entropy per position (megatron_m6.model.m6.token_losses), also of the
    vocabulary-parallel logits the LM head's plan leaves as a DTensor: under loss_parallel() their
    losses are computed without gathering the logits and come back replicated, a DTensor made a
    plain tensor here."""
    return full_tensor(m6.token_losses(logits, labels))
