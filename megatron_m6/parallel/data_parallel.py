"""Data parallelism in three strengths (`--data-parallel-sharding`):

- replicate: every rank holds everything; gradients are averaged with all-reduce, in fp32, in
  buckets after the last micro-batch, or per parameter as soon as each gradient is ready
  (`--overlap-grad-reduce`) so communication hides behind the rest of the backward pass.
- optimizer: FSDP2 without resharding after forward: parameters stay gathered between forward
  and backward, gradients and optimizer state are sharded (ZeRO-2-like).
- full: FSDP2 / ZeRO-3: parameters are gathered per block for forward and again for backward.

Gradients are averaged over data-parallel ranks; the trainer scales each rank's loss by the DP
size so that the average equals the gradient of the global-batch loss. Expert weights under
expert parallelism are reduced over expert-data-parallel ranks only, but still divided by the
full DP size: each one's local gradient already sums the contributions of its EP group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from megatron_m6.model.moe import MoEMLP
from megatron_m6.parallel.dtensor import local_tensor
from megatron_m6.parallel.expert_parallel import is_expert_param
from megatron_m6.precision import LayerNorm, reduce_dtype

FP32_BYTES = 4  # bucket sizes are counted in fp32, the dtype gradients are reduced in


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, edp_mesh: DeviceMesh,
               reshard_after_forward: bool, bf16: bool) -> None:
    """Shard each block, then the rest of the model, over the data-parallel mesh; experts that
    expert parallelism already split are sharded over the expert-data-parallel mesh (FSDP then
    averages their gradients over edp only: the caller divides them by ep as well).

    Mixed precision follows megatron_m6/precision.py: with bf16 a block's matmul weights are
    gathered in bf16 (autocast would round them the same way), its LayerNorms and router form a
    unit of their own that stays in fp32, and so does everything outside the blocks (the ResNet
    with its BatchNorms, the embeddings, the final norm; autocast casts their matmuls). Block
    inputs are not cast: the residual stream stays fp32. Gradients are reduced in fp32."""
    kept = MixedPrecisionPolicy()  # the parameters' own dtype, for compute and reduction
    matmul = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                   cast_forward_inputs=False) if bf16 else kept)
    shard = dict(reshard_after_forward=reshard_after_forward)
    for block in model.layers.values():
        for module in block.modules():
            if isinstance(module, MoEMLP) and is_expert_param(module.experts.w1):
                fully_shard(module.experts, mesh=edp_mesh, mp_policy=matmul, **shard)
        if bf16:
            fp32 = [m for m in block.modules() if isinstance(m, LayerNorm)]
            fp32 += [m.router for m in block.modules() if isinstance(m, MoEMLP)]
            fully_shard(fp32, mesh=dp_mesh, mp_policy=kept, **shard)
        fully_shard(block, mesh=dp_mesh, mp_policy=matmul, **shard)
    fully_shard(model, mesh=dp_mesh, mp_policy=kept, **shard)
    # A rank whose micro-batch has no image never touches the image encoder: reduce zeros for
    # it rather than skip it, or the ranks' reduce-scatters would not match.
    model.set_reduce_scatter_unused_params(True)


class GradAllReduce:
    """Plain data parallel: average every gradient over the DP group, in fp32 buckets.

    Buckets hold parameters in reverse registration order (roughly the order backward produces
    their gradients) and are reduced strictly in that order on every rank, so collectives match
    even when ranks finish gradients in different orders. A parameter this rank did not use
    (e.g. the image encoder on a text-only micro-batch) contributes zeros, so every replica
    applies the same update.
    """

    def __init__(self, model: nn.Module, dp_group: dist.ProcessGroup, edp_group: dist.ProcessGroup,
                 overlap: bool, bucket_bytes: int = 32 * 2**20):
        self.size = dist.get_world_size(dp_group)  # the divisor, for expert weights too
        # Buckets of one group each: (group, parameters).
        self.buckets: list[list[nn.Parameter]] = []
        self.groups: list[dist.ProcessGroup] = []
        filled = 0  # fp32 bytes in the last bucket
        for p in reversed([p for p in model.parameters() if p.requires_grad]):
            group = edp_group if is_expert_param(p) else dp_group
            nbytes = FP32_BYTES * p.numel()
            if not self.buckets or filled + nbytes > bucket_bytes or self.groups[-1] is not group:
                self.buckets.append([])
                self.groups.append(group)
                filled = 0
            self.buckets[-1].append(p)
            filled += nbytes
        self.bucket_of = {id(p): i for i, bucket in enumerate(self.buckets) for p in bucket}
        self.ready = [0] * len(self.buckets)
        self.next_bucket = 0
        self.pending: list[tuple[int, torch.Tensor, dist.Work]] = []
        self.last_micro_batch = False
        if overlap:
            for bucket in self.buckets:
                for p in bucket:
                    p.register_post_accumulate_grad_hook(self._grad_ready)

    def _grad_ready(self, p: torch.Tensor) -> None:
        if self.last_micro_batch:  # earlier micro-batches only accumulate locally
            self.ready[self.bucket_of[id(p)]] += 1
            while (self.next_bucket < len(self.buckets)
                   and self.ready[self.next_bucket] == len(self.buckets[self.next_bucket])):
                self._launch(self.next_bucket)

    def _launch(self, index: int) -> None:
        for p in self.buckets[index]:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [local_tensor(p.grad) for p in self.buckets[index]]
        flat = torch.cat([g.reshape(-1).to(reduce_dtype(g.dtype)) for g in grads])
        self.pending.append((index, flat, dist.all_reduce(flat, group=self.groups[index], async_op=True)))
        self.next_bucket = index + 1

    def before_backward(self, last_micro_batch: bool) -> None:
        self.last_micro_batch = last_micro_batch

    def finish(self) -> None:
        """Issue the buckets not yet reduced, wait for all, and write back the averages."""
        while self.next_bucket < len(self.buckets):
            self._launch(self.next_bucket)
        for index, flat, work in self.pending:
            work.wait()
            grads = [local_tensor(p.grad) for p in self.buckets[index]]
            for g, chunk in zip(grads, flat.div_(self.size).split([g.numel() for g in grads])):
                g.copy_(chunk.view_as(g))
        self.pending.clear()
        self.ready = [0] * len(self.buckets)
        self.next_bucket = 0
