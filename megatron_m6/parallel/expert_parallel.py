"""Expert parallelism: each EP rank holds E/ep experts; tokens travel to their experts and back
with all-to-all, around the one call every MoE dispatch path makes: `experts(rows, counts)`,
rows grouped by (global) expert.

Forward: counts are exchanged first, then each rank sends the rows of the experts rank j holds
to rank j (uneven splits), regroups what it received from source-major to expert-major order,
runs its local experts, and sends the outputs back in the order they came. Routing, dropping,
the aux loss and the gate-weighted combine stay on the token's own rank, so they are exactly
the single-process computation on that rank's micro-batch. Expert weights are DTensors sharded
over the `ep` mesh dimension, so their names and global shapes do not depend on the layout; the
dispatch hands the experts this rank's shards to compute with.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor

from megatron_m6.model.moe import ExpertWeights, MoEMLP


class AllToAllDispatch:
    """Forward pre/post hooks on a GroupedExperts module (one dispatch in flight at a time;
    activation recomputation re-runs pre and post in pairs)."""

    def __init__(self, group: dist.ProcessGroup, num_local: int):
        self.group, self.ep, self.num_local = group, dist.get_world_size(group), num_local
        self.state: tuple | None = None

    def dispatch(self, module: nn.Module, args: tuple) -> tuple:
        rows, counts = args  # counts: this rank's rows per global expert
        send = counts.view(self.ep, self.num_local)  # [destination rank, its local expert]
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)  # [source rank, my local expert]
        # The split sizes must be on the host for the all-to-all: the one device sync of a
        # dispatch, inherent to uneven all-to-all. Rows past the counted ones (a buffer sized
        # without reading the device) stay behind.
        send_splits, recv_splits = send.sum(1).tolist(), recv.sum(1).tolist()
        received = all_to_all_single_autograd(rows[:sum(send_splits)], recv_splits, send_splits, self.group)
        # Received rows are grouped by source rank; the experts want them grouped by expert.
        expert_of_row = torch.repeat_interleave(
            torch.arange(self.num_local, device=rows.device).repeat(self.ep), recv.flatten())
        order = torch.argsort(expert_of_row, stable=True)
        self.state = (order, send_splits, recv_splits)
        local = ExpertWeights(*(p.to_local() for p in (module.w1, module.b1, module.w2, module.b2)))
        return received[order], recv.sum(0), local

    def combine(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        order, send_splits, recv_splits = self.state
        self.state = None
        back = torch.empty_like(output).index_copy(0, order, output)  # undo the regrouping
        # A plain tensor, not the functional collective's lazy wrapper: the fused (Triton)
        # unpermute reads its data pointer directly.
        return wait_tensor(all_to_all_single_autograd(back, send_splits, recv_splits, self.group))


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh) -> None:
    """Shard every MoE layer's experts over `ep_mesh` and route tokens to them by all-to-all."""
    ep = ep_mesh.size()
    for module in model.modules():
        if not isinstance(module, MoEMLP):
            continue
        experts = module.experts
        for name, param in list(experts.named_parameters(recurse=False)):
            sharded = distribute_tensor(param.detach(), ep_mesh, [Shard(0)])
            experts.register_parameter(name, nn.Parameter(sharded, requires_grad=param.requires_grad))
        hooks = AllToAllDispatch(ep_mesh.get_group(), module.cfg.num_experts // ep)
        experts.register_forward_pre_hook(hooks.dispatch)
        experts.register_forward_hook(hooks.combine)


def is_expert_param(p: torch.Tensor) -> bool:
    """Expert weights under EP: their gradients are reduced over expert-data-parallel only."""
    mesh = getattr(p, "device_mesh", None)
    return mesh is not None and "ep" in (mesh.mesh_dim_names or ())
