"""The loss accounting of a step, an interval or an evaluation: summed target losses and token
counts, overall and per pretraining task, and the summed MoE auxiliary loss.

Everything is float64 on the device where the losses were computed, added to in place and never
read back here: the trainer reads it once per log interval. It travels as one flat tensor
(`to_tensor`/`from_tensor`), so that one all-reduce sums it over ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_m6.data.task_spec import TASK_NAMES


@dataclass
class LossSums:
    loss: torch.Tensor  # () summed target cross entropy, as the objective sums it: the step's loss
    task_loss: torch.Tensor  # [tasks] the same per task, summed per sample: the logged task losses
    task_tokens: torch.Tensor  # [tasks] target tokens
    aux: torch.Tensor  # () summed MoE auxiliary loss of the micro-batches

    @classmethod
    def zeros(cls, device: torch.device = torch.device("cpu")) -> LossSums:
        zeros = lambda *shape: torch.zeros(shape, dtype=torch.float64, device=device)
        return cls(zeros(), zeros(len(TASK_NAMES)), zeros(len(TASK_NAMES)), zeros())

    def add(self, ce: torch.Tensor, loss_mask: torch.Tensor, task_id: torch.Tensor,
            aux: torch.Tensor) -> torch.Tensor:
        """Add one micro-batch (`ce`: cross entropy per position, `task_id`: one per sample,
        `aux`: its MoE auxiliary loss); returns its summed target loss, still differentiable:
        the numerator of the objective."""
        loss_sum = (ce * loss_mask).sum()
        self.loss += loss_sum.detach().double()
        self.task_loss.index_add_(0, task_id, (ce.detach() * loss_mask).sum(1).double())
        self.task_tokens.index_add_(0, task_id, loss_mask.sum(1).double())
        self.aux += aux.detach().sum().double()
        return loss_sum

    def __iadd__(self, other: LossSums) -> LossSums:
        self.loss += other.loss
        self.task_loss += other.task_loss
        self.task_tokens += other.task_tokens
        self.aux += other.aux
        return self

    def to_tensor(self) -> torch.Tensor:
        """One flat float64 vector: loss, task losses, task tokens, aux."""
        return torch.cat([self.loss[None], self.task_loss, self.task_tokens, self.aux[None]])

    @classmethod
    def from_tensor(cls, flat: torch.Tensor) -> LossSums:
        """The sums of a `to_tensor` vector (views into it)."""
        n = len(TASK_NAMES)
        loss, task_loss, task_tokens, aux = flat.split([1, n, n, 1])
        return cls(loss[0], task_loss, task_tokens, aux[0])
