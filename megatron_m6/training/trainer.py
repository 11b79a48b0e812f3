"""The training loop: gradient accumulation to the global batch, clipping, LR schedule, logging,
evaluation, NaN detection and exact-resume checkpoints."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.profiler import record_function

from megatron_m6.config import RunConfig
from megatron_m6.conversion import is_release, load_release_into_parts, release_config, release_meta
from megatron_m6.data.task_spec import TASK_NAMES
from megatron_m6.parallel import ParallelDims, ParallelState
from megatron_m6.parallel.tensor_parallel import token_losses
from megatron_m6.precision import PARAMS_DTYPES
from megatron_m6.training import checkpoint as ckpt
from megatron_m6.training.loss_sums import LossSums
from megatron_m6.training.preemption import StopAgreement
from megatron_m6.training.profiling import StepProfiler
from megatron_m6.training.schedule import learning_rate
from megatron_m6.training.throughput import PeakFlops, StepFlops, device_peak
from megatron_m6.training.timers import StepTimers, slowest_rank


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a NaN loss); the message names the iteration."""


def build_optimizer(model: nn.Module, cfg: RunConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with no weight decay on biases and norm weights; fused kernel on GPU.

    Parameters are grouped by kind as well (plain tensors, DTensors of each mesh), since the
    multi-tensor kernels cannot mix them within one group."""
    groups: dict[tuple, list] = {}
    for p in model.parameters():
        if p.requires_grad:
            mesh = getattr(p, "device_mesh", None)
            key = (p.ndim >= 2, None if mesh is None else (mesh.mesh_dim_names, tuple(p.placements)))
            groups.setdefault(key, []).append(p)
    groups = [{"params": params, "weight_decay": cfg.weight_decay if decay else 0.0}
              for (decay, _), params in groups.items()]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             eps=cfg.adam_eps, fused=device.type == "cuda")


@dataclass
class StepStats:
    """Sums over one log interval, turned into the log line. The tensors stay on the device
    (added to without reading them back) and are read once, by log_stats."""

    device: torch.device = torch.device("cpu")
    sums: LossSums = field(init=False)  # of this rank's micro-batches
    grad_norm: torch.Tensor = field(init=False)  # summed per-step gradient norm
    tokens: int = 0  # counted from the batches on the host, before they move to the device
    samples: int = 0
    images: int = 0  # image samples
    micro_batches: int = 0  # of this rank
    steps: int = 0
    start: float = field(default_factory=time.perf_counter)

    def __post_init__(self):
        self.sums = LossSums.zeros(self.device)
        self.grad_norm = torch.zeros((), dtype=torch.float64, device=self.device)


class Trainer:
    def __init__(self, cfg: RunConfig, model: nn.Module, eval_loader_fn=None,
                 device: torch.device = torch.device("cpu"), log=print,
                 parallel: ParallelState | None = None, vocab_sha256: str | None = None):
        self.cfg, self.model, self.device = cfg, model, device
        self.parallel = parallel or ParallelState(ParallelDims(world_size=1))
        self.log = log if self.parallel.is_logging_rank else (lambda line: None)
        # Micro-batches per rank per step: the global batch is split over data-parallel ranks.
        self.num_micro_batches = cfg.micro_batches_per_rank(self.parallel.dims.dp)
        self.optimizer = build_optimizer(model, cfg, device)
        self.eval_loader_fn = eval_loader_fn  # () -> iterable of batches
        self.iteration = 0
        self.consumed_samples = 0
        self.history: list[float] = []  # global-batch loss per iteration
        self.checkpointer = (ckpt.Checkpointer(cfg.save, cfg.async_save, cfg.keep_last,
                                             timedelta(minutes=cfg.distributed_timeout_minutes))
                             if cfg.save else None)
        self.early_stop = StopAgreement(cfg)  # --exit-signal-handler, --exit-duration-in-mins
        self.timers = StepTimers(device)
        self.profiler = StepProfiler(cfg, device, dist.get_rank() if dist.is_initialized() else 0, log)
        self.vocab_sha256 = vocab_sha256  # of the run's vocab.txt (None with --mock-data)
        self.writer = None
        if cfg.tensorboard_dir and self.parallel.is_logging_rank:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(cfg.tensorboard_dir)

    # Counted and measured at the first log line, so a run that never logs pays nothing.
    @functools.cached_property
    def _model_flops(self) -> StepFlops:
        return StepFlops.of(self.cfg)

    @functools.cached_property
    def _peak(self) -> PeakFlops:
        peak = device_peak(self.cfg, self.device)
        self.log(f"MFU against {peak.tflops:.4g} TFLOP/s per device: {peak.source}")
        return peak

    # -- one step ---------------------------------------------------------------------------
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16)

    def _to_device(self, batch: dict) -> dict:
        """The batch on this rank's device; images and masks in the parameters' dtype (a
        float64 run computes in float64 throughout; autocast casts for bf16)."""
        dtype = PARAMS_DTYPES[self.cfg.params_dtype]
        return {k: v.to(self.device, dtype=dtype if v.is_floating_point() else v.dtype, non_blocking=True)
                for k, v in batch.items()}

    def forward_loss(self, batch: dict, sums: LossSums) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed target loss, MoE aux loss) of one micro-batch, differentiable; both are also
        added to `sums`."""
        with self._autocast():
            logits, aux = self.model(batch["tokens"], batch["prefix_len"], batch["valid_len"],
                                     batch["images"], batch["has_image"])
        ce = token_losses(logits, batch["labels"])
        return sums.add(ce, batch["loss_mask"], batch["task_id"], aux), aux

    def train_step(self, micro_batches: list[dict], stats: StepStats) -> float:
        """One optimizer step on the global batch; returns its loss."""
        step_loss = self.forward_backward(micro_batches, stats)
        self.optimizer_step()
        return step_loss

    def forward_backward(self, micro_batches: list[dict], stats: StepStats) -> float:
        """Forward/backward every micro-batch, then synchronise and clip the gradients; the
        loss is averaged over the global batch's targets.

        Gradients are averaged over DP ranks, so each rank's share of the global-batch loss is
        scaled by the DP size: the average is then the gradient of the global-batch loss.

        The step reads the device once, at its end: the loss and the gradient norm together, so
        that a NaN stops training before the optimizer step writes it into the weights."""
        parallel = self.parallel
        lr = learning_rate(self.cfg, self.iteration)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        local_targets = sum(b["loss_mask"].sum() for b in micro_batches).double()
        total_targets = parallel.all_reduce_dp(local_targets.to(self.device)).clamp(min=1.0)
        for batch in micro_batches:  # host tensors: no device read
            stats.tokens += int(batch["valid_len"].sum())
            stats.samples += batch["tokens"].shape[0]
            stats.images += int(batch["has_image"].sum())
        stats.micro_batches += len(micro_batches)
        with self.timers.forward_backward():
            if parallel.pipeline is not None:
                step = self._pipeline_forward_backward(micro_batches, total_targets)
            else:
                step = self._forward_backward_micro_batches(micro_batches, total_targets)
        stats.sums += step  # before the all-reduce below sums step.loss in place
        with self.timers.grad_sync(), record_function("communication"):
            parallel.finish_grad_sync(self.model)
            params = [p for p in self.model.parameters() if p.requires_grad]
            grad_norm = parallel.clip_grad_norm_(params, self.cfg.clip_grad or math.inf)
            step_loss_t = parallel.all_reduce_dp(step.loss) / total_targets
        stats.grad_norm += grad_norm.detach().double()
        stats.steps += 1
        step_loss, norm = torch.stack([step_loss_t, grad_norm.detach().double()]).tolist()
        # The same global values on every rank: all stop together.
        if not math.isfinite(step_loss):
            raise TrainingError(f"loss is {step_loss} at iteration {self.iteration + 1}; "
                                "stopping (try a lower --lr or check the data)")
        if not math.isfinite(norm):
            raise TrainingError(f"gradient norm is {norm} at iteration {self.iteration + 1}")
        self.history.append(step_loss)
        return step_loss

    def _forward_backward_micro_batches(self, micro_batches: list[dict],
                                        total_targets: torch.Tensor) -> LossSums:
        """One process or stage per rank: forward and backward each micro-batch in turn; returns
        this rank's loss sums of the step.

        The aux loss is a mean over the micro-batches of all DP ranks (n * dp of them)."""
        parallel, n = self.parallel, len(micro_batches)
        sums = LossSums.zeros(self.device)
        for i, batch in enumerate(micro_batches):
            with parallel.loss_context():
                with record_function("forward"):
                    loss_sum, aux = self.forward_loss(self._to_device(batch), sums)
                    loss = loss_sum / total_targets.to(loss_sum.dtype) * parallel.dims.dp + aux / n
                parallel.before_backward(self.model, last_micro_batch=i == n - 1)
                with record_function("backward"):
                    loss.backward()
        return sums

    def _pipeline_forward_backward(self, micro_batches: list[dict], total_targets: torch.Tensor) -> LossSums:
        """Pipeline parallel: the schedule interleaves the micro-batches over the stages; the
        last stage computes the loss, and its sums reach every stage."""
        with self.parallel.loss_context(), self._autocast():
            return self.parallel.pipeline.forward_backward(
                [self._to_device(b) for b in micro_batches], self.cfg.model,
                scale=self.parallel.dims.dp / total_targets)

    def optimizer_step(self) -> None:
        with self.timers.optimizer(), record_function("optimizer"):
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.iteration += 1
        self.consumed_samples += self.cfg.global_batch_size

    # -- the loop ---------------------------------------------------------------------------
    def train(self, train_loader) -> list[float]:
        """Run to `train_iters`; `train_loader` must start at `self.consumed_samples`."""
        try:
            self._train(iter(train_loader))
        finally:  # a background save still in flight is finished, even when training failed
            self.profiler.close()
            self.finish_saving()
        if self.writer:
            self.writer.close()
        return self.history

    def _train(self, batches) -> None:
        cfg, stats, saved = self.cfg, StepStats(self.device), False
        with self.early_stop:
            while self.iteration < cfg.train_iters:
                self.profiler.before_step(self.iteration + 1)
                with self.timers.data_wait(), record_function("data_wait"):
                    micro = list(itertools.islice(batches, self.num_micro_batches))
                if len(micro) < self.num_micro_batches:
                    raise TrainingError(f"data ran out at iteration {self.iteration + 1}")
                try:
                    self.train_step(micro, stats)
                except torch.OutOfMemoryError as e:
                    raise self._out_of_memory(e) from e
                self.profiler.after_step(self.iteration)
                if self.checkpointer:
                    self._log_published(self.checkpointer.poll())
                if self.iteration % cfg.log_interval == 0 or self.iteration == cfg.train_iters:
                    self.log_stats(stats)
                    stats = StepStats(self.device)
                if cfg.eval_interval and self.iteration % cfg.eval_interval == 0 and self.eval_loader_fn:
                    self.evaluate()
                saved = bool(cfg.save and cfg.save_interval and self.iteration % cfg.save_interval == 0)
                if saved:
                    self.save()
                if cfg.exit_interval and self.iteration % cfg.exit_interval == 0:
                    self.log(f"exiting at iteration {self.iteration} (--exit-interval)")
                    break
                reason = self.early_stop.should_stop()  # the same answer on every rank
                if reason:
                    if not saved:
                        self.save()
                    self.finish_saving()  # a background save is published before we go
                    self.early_stop.wait_for_all_ranks()
                    self.log(f"{reason}: saved checkpoint at iteration {self.iteration}, exiting")
                    return
            if cfg.save and not saved:
                self.save()

    def _out_of_memory(self, error: torch.OutOfMemoryError) -> TrainingError:
        """One clear error for an out-of-memory step, with the memory snapshot when recording."""
        snapshot = self.profiler.dump_memory_snapshot("oom")
        where = (f"memory snapshot written to {snapshot} (open it at https://pytorch.org/memory_viz)"
                 if snapshot else "--record-memory-history shows where the memory goes")
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else "out of memory"
        return TrainingError(f"out of memory at iteration {self.iteration + 1}: {first_line}; {where}; "
                             "try --recompute-granularity, a smaller --micro-batch-size or more "
                             "model-parallel ranks")

    def log_stats(self, s: StepStats) -> None:
        elapsed = time.perf_counter() - s.start
        pipeline = self.parallel.pipeline
        timers = slowest_rank(self.timers.pop_seconds(pipeline.compute_timer.pop_seconds() if pipeline else None),
                              self.device)
        # The loss sums and the host's counts summed over DP ranks in one all-reduce; the gradient
        # norm is the same on every rank.
        counts = torch.tensor([s.tokens, s.samples, s.images], dtype=torch.float64, device=self.device)
        totals = self.parallel.all_reduce_dp(torch.cat([s.sums.to_tensor(), counts]))
        if not self.parallel.is_logging_rank:  # it took part in the all-reduce; the rest is the log's
            return
        totals = torch.cat([totals, s.grad_norm[None]]).cpu()  # the interval's one read of the device
        sums = LossSums.from_tensor(totals[:-4])
        tokens, samples, images, grad_norm = totals[-4:].tolist()
        aux = float(sums.aux) / (self.parallel.dims.dp * s.micro_batches)  # mean per micro-batch
        grad_norm /= s.steps
        task_tokens = sums.task_tokens
        losses = sums.task_loss / task_tokens.clamp(min=1)
        mean = float(sums.task_loss.sum() / task_tokens.sum().clamp(min=1))
        parts = [f"iteration {self.iteration:6d}/{self.cfg.train_iters}", f"loss {mean:.4f}"]
        parts += [f"{name} {losses[i]:.3f}" for i, name in enumerate(TASK_NAMES) if task_tokens[i] > 0]
        if self.cfg.model.num_experts:
            parts.append(f"moe aux {aux:.4f}")
        lr = learning_rate(self.cfg, self.iteration - 1)
        parts += [f"lr {lr:.3e}", f"grad norm {grad_norm:.3f}",
                  f"tokens/s {tokens / elapsed:.0f}", f"samples/s {samples / elapsed:.1f}"]
        tflops = self._model_flops(samples, images) / self.parallel.dims.world_size / elapsed / 1e12
        mfu = tflops / self._peak.tflops
        parts += [f"TFLOP/s/GPU {tflops:.4g}", f"MFU {100 * mfu:.3g}%"]
        memory = {}
        if self.device.type == "cuda":
            memory = {"max_allocated_gib": torch.cuda.max_memory_allocated(self.device) / 2**30,
                      "max_reserved_gib": torch.cuda.max_memory_reserved(self.device) / 2**30}
            parts.append("peak memory {max_allocated_gib:.1f} GiB allocated, {max_reserved_gib:.1f} GiB reserved"
                         .format(**memory))
        self.log(" | ".join(parts))
        ms = {name: 1e3 * seconds / s.steps for name, seconds in timers.items()}  # per step
        self.log("time per step, slowest rank (ms): " + " | ".join(f"{name} {t:.1f}" for name, t in ms.items()))
        if self.writer:
            it = self.iteration
            self.writer.add_scalar("loss/total", mean, it)
            for i, name in enumerate(TASK_NAMES):
                if task_tokens[i] > 0:
                    self.writer.add_scalar(f"loss/{name}", float(losses[i]), it)
            self.writer.add_scalar("moe_aux_loss", aux, it)
            self.writer.add_scalar("lr", lr, it)
            self.writer.add_scalar("grad_norm", grad_norm, it)
            self.writer.add_scalar("throughput/tokens_per_s", tokens / elapsed, it)
            self.writer.add_scalar("throughput/samples_per_s", samples / elapsed, it)
            self.writer.add_scalar("throughput/tflops_per_gpu", tflops, it)
            self.writer.add_scalar("throughput/mfu", mfu, it)
            for name, gib in memory.items():
                self.writer.add_scalar(f"memory/{name}", gib, it)
            if self.cfg.log_timers_to_tensorboard:
                for name, t in ms.items():
                    self.writer.add_scalar(f"timers/{name}_ms", t, it)

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        sums = LossSums.zeros(self.device)
        pipeline = self.parallel.pipeline
        if pipeline is not None:  # whole schedules of micro-batches
            n = self.num_micro_batches
            loader = iter(self.eval_loader_fn())
            for _ in range(-(-self.cfg.eval_iters // n)):
                group = [self._to_device(b) for b in itertools.islice(loader, n)]
                with self.parallel.loss_context(), self._autocast():
                    sums += pipeline.evaluate(group, self.cfg.model)
        else:
            for batch in itertools.islice(self.eval_loader_fn(), self.cfg.eval_iters):
                with self.parallel.loss_context():
                    self.forward_loss(self._to_device(batch), sums)
        sums = LossSums.from_tensor(self.parallel.all_reduce_dp(sums.to_tensor()))
        loss_sum, targets = torch.stack([sums.loss, sums.task_tokens.sum()]).tolist()
        value = loss_sum / max(targets, 1.0)
        self.log(f"validation at iteration {self.iteration} | loss {value:.4f} | "
                 f"ppl {math.exp(min(value, 50)):.2f}")
        if self.writer:
            self.writer.add_scalar("loss/validation", value, self.iteration)
        return value

    # -- checkpoints ------------------------------------------------------------------------
    def save(self) -> None:
        """Model, optimizer and RNG states of every rank, plus the schedule position (the LR is
        a function of the iteration), data position, arguments and model config."""
        path = self.checkpointer.save(self.iteration, self.model, self.optimizer, self.checkpoint_meta())
        if self.cfg.async_save:
            self.log(f"saving checkpoint at iteration {self.iteration} to {path} in the background")
        else:
            self.log(f"saved checkpoint at iteration {self.iteration} to {path}")

    def checkpoint_meta(self) -> dict:
        """What a checkpoint records besides the weights, optimizer and RNG states."""
        return {"iteration": self.iteration, "consumed_samples": self.consumed_samples,
                "scheduler": {"iteration": self.iteration}, "vocab_sha256": self.vocab_sha256,
                "model_config": dataclasses.asdict(self.cfg.model), "args": dataclasses.asdict(self.cfg)}

    def finish_saving(self) -> None:
        """Wait for a background save to be written and published, and free its CPU copies."""
        if self.checkpointer:
            self._log_published(self.checkpointer.close())

    def _log_published(self, iteration: int | None) -> None:
        if iteration is not None:
            self.log(f"checkpoint at iteration {iteration} is complete (written in the background)")

    def load(self, load_dir: str) -> dict:
        """Resume from the latest checkpoint in `load_dir`, saved under any layout; the caller
        builds the data loader from consumed_samples. Returns the checkpoint's meta."""
        meta = ckpt.load_checkpoint(load_dir, self.model, self.optimizer, self.cfg.model,
                                    load_optim=not self.cfg.no_load_optim, load_rng=not self.cfg.no_load_rng)
        self.iteration = meta["iteration"]
        self.consumed_samples = meta["consumed_samples"]
        return meta

    def load_weights(self, load_dir: str) -> dict:
        """Start from the weights of the latest checkpoint in `load_dir`, or of the release there
        (fine-tuning): a fresh optimizer, schedule and iteration count, this run's RNG streams. A
        checkpoint trained on another vocabulary is refused, even where the padded sizes agree."""
        if is_release(load_dir):
            meta = self._load_release(load_dir)
        else:
            meta = ckpt.load_checkpoint(load_dir, self.model, self.optimizer, self.cfg.model,
                                        load_optim=False, load_rng=False)
        saved = meta.get("vocab_sha256")
        if saved and self.vocab_sha256 and saved != self.vocab_sha256:
            raise ckpt.CheckpointError(f"{load_dir} was trained with another vocabulary than "
                                       f"{self.cfg.vocab_file or 'the shipped one'}: token ids would not match")
        return meta

    def _load_release(self, path: str) -> dict:
        """A release's weights under this run's layout, and what a release keeps of a checkpoint's meta."""
        ckpt.check_model_config(dataclasses.asdict(release_config(path)), self.cfg.model)
        parts = list(self.model) if isinstance(self.model, nn.ModuleList) else [self.model]
        load_release_into_parts(path, parts, self.cfg.model)
        return release_meta(path)
