"""The training loop: gradient accumulation to the global batch, clipping, LR schedule, logging,
evaluation, NaN detection and exact-resume checkpoints."""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from megatron_m6.config import TASK_NAMES, RunConfig
from megatron_m6.model import token_losses
from megatron_m6.training import checkpoint as ckpt
from megatron_m6.training.schedule import learning_rate


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a NaN loss); the message names the iteration."""


def build_optimizer(model: nn.Module, cfg: RunConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with no weight decay on biases and norm weights; fused kernel on GPU."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             eps=cfg.adam_eps, fused=device.type == "cuda")


@dataclass
class StepStats:
    """Sums over one log interval, turned into the log line."""

    task_loss: torch.Tensor = field(default_factory=lambda: torch.zeros(len(TASK_NAMES), dtype=torch.float64))
    task_tokens: torch.Tensor = field(default_factory=lambda: torch.zeros(len(TASK_NAMES), dtype=torch.float64))
    aux: float = 0.0
    grad_norm: float = 0.0
    tokens: int = 0
    samples: int = 0
    steps: int = 0
    start: float = field(default_factory=time.perf_counter)


def per_task_loss(ce: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed target loss and target-token count per task, for logging (ce: per position)."""
    per_sample = (ce.detach() * batch["loss_mask"]).sum(1).double().cpu()
    count = batch["loss_mask"].sum(1).double().cpu()
    task = batch["task_id"].cpu()
    n = len(TASK_NAMES)
    return (torch.zeros(n, dtype=torch.float64).index_add_(0, task, per_sample),
            torch.zeros(n, dtype=torch.float64).index_add_(0, task, count))


class Trainer:
    def __init__(self, cfg: RunConfig, model: nn.Module, eval_loader_fn=None,
                 device: torch.device = torch.device("cpu"), log=print):
        self.cfg, self.model, self.device, self.log = cfg, model, device, log
        self.optimizer = build_optimizer(model, cfg, device)
        self.eval_loader_fn = eval_loader_fn  # () -> iterable of batches
        self.iteration = 0
        self.consumed_samples = 0
        self.history: list[float] = []  # global-batch loss per iteration
        self.writer = None
        if cfg.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(cfg.tensorboard_dir)

    # -- one step ---------------------------------------------------------------------------
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16)

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def forward_loss(self, batch: dict):
        """(cross entropy per position, summed target loss, MoE aux loss) of one micro-batch."""
        with self._autocast():
            logits, aux = self.model(batch["tokens"], batch["prefix_len"], batch["valid_len"],
                                     batch["images"], batch["has_image"])
        ce = token_losses(logits, batch["labels"])
        return ce, (ce * batch["loss_mask"]).sum(), aux

    def train_step(self, micro_batches: list[dict], stats: StepStats) -> float:
        """Forward/backward every micro-batch; loss averaged over the global batch's targets."""
        lr = learning_rate(self.cfg, self.iteration)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        total_targets = sum(float(b["loss_mask"].sum()) for b in micro_batches)
        step_loss = 0.0
        for batch in micro_batches:
            batch = self._to_device(batch)
            ce, loss_sum, aux = self.forward_loss(batch)
            loss = loss_sum / max(total_targets, 1.0) + aux / len(micro_batches)
            if not torch.isfinite(loss):
                raise TrainingError(f"loss is {loss.item()} at iteration {self.iteration + 1}; "
                                    "stopping (try a lower --lr or check the data)")
            loss.backward()
            step_loss += loss_sum.item() / max(total_targets, 1.0)
            task_loss, task_tokens = per_task_loss(ce, batch)
            stats.task_loss += task_loss
            stats.task_tokens += task_tokens
            stats.aux += float(aux.detach()) / len(micro_batches)
            stats.tokens += int(batch["valid_len"].sum())
            stats.samples += batch["tokens"].shape[0]
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad or math.inf)
        if not torch.isfinite(grad_norm):
            raise TrainingError(f"gradient norm is {grad_norm.item()} at iteration {self.iteration + 1}")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.iteration += 1
        self.consumed_samples += sum(b["tokens"].shape[0] for b in micro_batches)
        stats.grad_norm += float(grad_norm)
        stats.steps += 1
        self.history.append(step_loss)
        return step_loss

    # -- the loop ---------------------------------------------------------------------------
    def train(self, train_loader) -> list[float]:
        """Run to `train_iters`; `train_loader` must start at `self.consumed_samples`."""
        cfg = self.cfg
        batches = iter(train_loader)
        stats = StepStats()
        saved = False
        while self.iteration < cfg.train_iters:
            micro = list(itertools.islice(batches, cfg.num_micro_batches))
            if len(micro) < cfg.num_micro_batches:
                raise TrainingError(f"data ran out at iteration {self.iteration + 1}")
            self.train_step(micro, stats)
            if self.iteration % cfg.log_interval == 0 or self.iteration == cfg.train_iters:
                self.log_stats(stats)
                stats = StepStats()
            if cfg.eval_interval and self.iteration % cfg.eval_interval == 0 and self.eval_loader_fn:
                self.evaluate()
            saved = bool(cfg.save and cfg.save_interval and self.iteration % cfg.save_interval == 0)
            if saved:
                self.save()
            if cfg.exit_interval and self.iteration % cfg.exit_interval == 0:
                self.log(f"exiting at iteration {self.iteration} (--exit-interval)")
                break
        if cfg.save and not saved:
            self.save()
        if self.writer:
            self.writer.close()
        return self.history

    def log_stats(self, s: StepStats) -> None:
        elapsed = time.perf_counter() - s.start
        losses = s.task_loss / s.task_tokens.clamp(min=1)
        mean = float(s.task_loss.sum() / s.task_tokens.sum().clamp(min=1))
        parts = [f"iteration {self.iteration:6d}/{self.cfg.train_iters}", f"loss {mean:.4f}"]
        parts += [f"{name} {losses[i]:.3f}" for i, name in enumerate(TASK_NAMES) if s.task_tokens[i] > 0]
        if self.cfg.model.num_experts:
            parts.append(f"moe aux {s.aux / s.steps:.4f}")
        lr = learning_rate(self.cfg, self.iteration - 1)
        parts += [f"lr {lr:.3e}", f"grad norm {s.grad_norm / s.steps:.3f}",
                  f"tokens/s {s.tokens / elapsed:.0f}", f"samples/s {s.samples / elapsed:.1f}"]
        self.log(" | ".join(parts))
        if self.writer:
            it = self.iteration
            self.writer.add_scalar("loss/total", mean, it)
            for i, name in enumerate(TASK_NAMES):
                if s.task_tokens[i] > 0:
                    self.writer.add_scalar(f"loss/{name}", float(losses[i]), it)
            self.writer.add_scalar("moe_aux_loss", s.aux / s.steps, it)
            self.writer.add_scalar("lr", lr, it)
            self.writer.add_scalar("grad_norm", s.grad_norm / s.steps, it)
            self.writer.add_scalar("throughput/tokens_per_s", s.tokens / elapsed, it)
            self.writer.add_scalar("throughput/samples_per_s", s.samples / elapsed, it)

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        loss_sum, targets = 0.0, 0.0
        for batch in itertools.islice(self.eval_loader_fn(), self.cfg.eval_iters):
            batch = self._to_device(batch)
            _, loss, _ = self.forward_loss(batch)
            loss_sum += loss.item()
            targets += float(batch["loss_mask"].sum())
        value = loss_sum / max(targets, 1.0)
        self.log(f"validation at iteration {self.iteration} | loss {value:.4f} | "
                 f"ppl {math.exp(min(value, 50)):.2f}")
        if self.writer:
            self.writer.add_scalar("loss/validation", value, self.iteration)
        return value

    # -- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "iteration": self.iteration, "consumed_samples": self.consumed_samples,
                "scheduler": {"iteration": self.iteration}, "rng": ckpt.rng_state(),
                "model_config": dataclasses.asdict(self.cfg.model),
                "args": dataclasses.asdict(self.cfg)}

    def save(self) -> None:
        path = ckpt.save_checkpoint(self.cfg.save, self.iteration, self.state_dict())
        self.log(f"saved checkpoint at iteration {self.iteration} to {path}")

    def load(self, state: dict) -> None:
        """Restore a `state_dict()`; the caller rebuilds the data loader from consumed_samples."""
        ckpt.check_model_config(state["model_config"], self.cfg.model)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.iteration = state["iteration"]
        self.consumed_samples = state["consumed_samples"]
        ckpt.set_rng_state(state["rng"])
