"""Pipeline parallelism with `torch.distributed.pipelining`: 1F1B, interleaved 1F1B (several
stages per rank, `--num-layers-per-virtual-pipeline-stage`) and the interleaved zero-bubble
schedule (`--pipeline-schedule zero_bubble`).

The model is built on the meta device and each rank keeps and materialises only its own stages,
so a large model is never built whole on one rank. A stage is M6 itself with the modules of
other stages removed (`layers.{global index}` kept, `embedding` only on the first stage,
`final_norm` and `lm_head` only on the last), so checkpoints and the other plans see the same
names in every layout. With tied
embeddings the first and last stages each hold the word embedding; their gradients are summed
over the two stages, which is exactly the gradient of the tied weight in one process.
"""

from __future__ import annotations

import copy
import functools
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
)
from torch.profiler import record_function

from megatron_m6.config import ModelConfig, RunConfig
from megatron_m6.model.m6 import M6, text_positions
from megatron_m6.parallel.tensor_parallel import token_losses
from megatron_m6.precision import PARAMS_DTYPES, compute_dtype, fp32_or_wider, to_compute_dtype
from megatron_m6.training.loss_sums import LossSums
from megatron_m6.training.timers import IntervalTimer


def stages_of_rank(pp_rank: int, pp: int, num_layers: int, layers_per_virtual_stage: int | None) -> list[int]:
    """Stage indices held by a pipeline rank: one, or every pp-th one when interleaved."""
    virtual = num_layers // (pp * layers_per_virtual_stage) if layers_per_virtual_stage else 1
    return [pp_rank + k * pp for k in range(virtual)]


def pipeline_stage(model: M6, stage: int, num_stages: int, cfg: RunConfig) -> M6:
    """One pipeline stage of a (meta-device) M6: a copy without the other stages' layers, with
    the embedding only on the first stage and the final norm and head only on the last, fitted
    to the schedule's calls (see `_receive` and `_send`)."""
    stage_model = copy.deepcopy(model, memo={id(model.cfg): model.cfg})
    per_stage = model.cfg.num_layers // num_stages
    for i in range(model.cfg.num_layers):
        if not stage * per_stage <= i < (stage + 1) * per_stage:
            del stage_model.layers[str(i)]
    if stage != 0:
        stage_model.embedding = None
    if stage != num_stages - 1:
        stage_model.final_norm = stage_model.lm_head = None
        stage_model.register_forward_hook(_send)
    stage_model.register_forward_pre_hook(functools.partial(_receive, aux_dtype=PARAMS_DTYPES[cfg.params_dtype]),
                                          with_kwargs=True)
    return stage_model


def _receive(stage: M6, args: tuple, kwargs: dict, aux_dtype: torch.dtype) -> tuple[tuple, dict]:
    """The schedule calls the first stage with (tokens, images), every other with what the
    previous stage sent, (hidden, aux), and all with the batch's other inputs by name; M6.forward
    takes the images and the running aux loss by name. Hidden states arrive in the compute dtype
    and carry on in the fp32 residual stream (megatron_m6/precision.py)."""
    if stage.embedding is not None:
        tokens, images = args
        # A leaf, so the aux stream has a gradient path even through stages without MoE.
        aux = torch.zeros(1, dtype=aux_dtype, device=tokens.device, requires_grad=True)
        return (tokens,), {**kwargs, "images": images, "aux": aux}
    hidden, aux = args
    return (fp32_or_wider(hidden),), {**kwargs, "aux": aux}


def _send(stage: M6, args: tuple, output: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A stage without the head sends its hidden states in the compute dtype (bf16 under
    autocast, half the bytes), with the running aux loss."""
    hidden, aux = output
    return to_compute_dtype(hidden), aux


class TimedStage(PipelineStage):
    """A PipelineStage that times its compute and names it for the profiler: the time the
    schedule spends outside these calls (and the loss) is the bubble, waiting for other stages."""

    def __init__(self, *args, timer: IntervalTimer, **kwargs):
        super().__init__(*args, **kwargs)
        self.timer = timer

    def forward_one_chunk(self, *args, **kwargs):
        with self.timer(), record_function("forward"):
            return super().forward_one_chunk(*args, **kwargs)

    def backward_one_chunk(self, *args, **kwargs):
        with self.timer(), record_function("backward"):
            return super().backward_one_chunk(*args, **kwargs)

    def backward_weight_one_chunk(self, *args, **kwargs):  # the zero-bubble schedule's W step
        with self.timer(), record_function("backward"):
            return super().backward_weight_one_chunk(*args, **kwargs)


class PipelineLoss:
    """The last stage's loss per micro-batch, and the sums the trainer logs. Targets travel
    packed as [micro-batch, 3, S]: labels, loss mask, task id."""

    def __init__(self, device: torch.device, timer: IntervalTimer):
        self.device, self.timer = device, timer
        self.scale = torch.ones((), device=device)  # dp / global target count, set per step
        self.aux_scale = 1.0  # 1 / micro-batches per rank
        self.reset()

    def reset(self) -> None:
        self.sums = LossSums.zeros(self.device)

    def __call__(self, output, target: torch.Tensor) -> torch.Tensor:
        with self.timer(), record_function("forward"):
            logits, aux = output
            labels, mask, task = target[:, 0], target[:, 1].float(), target[:, 2, 0]
            loss_sum = self.sums.add(token_losses(logits, labels), mask, task, aux)
            return loss_sum * self.scale.to(loss_sum.dtype) + aux.sum() * self.aux_scale


class PipelineRunner:
    """Drives the schedule for the trainer: one call per step (or per evaluation batch)."""

    def __init__(self, stages: list[M6], stage_ids: list[int], num_stages: int,
                 mesh: DeviceMesh, device: torch.device, cfg: RunConfig, num_micro_batches: int):
        pp = mesh["pp"].size()
        # The schedule's sends may still be in flight when a step returns: reductions of the
        # step's sums (and of the gradient norm) use their own group of the same ranks.
        pp_groups = mesh.mesh.permute(1, 2, 3, 0).reshape(-1, pp).tolist()
        self.pp_group, _ = dist.new_subgroups_by_enumeration(
            pp_groups, timeout=timedelta(minutes=cfg.distributed_timeout_minutes))
        self.is_first = 0 in stage_ids
        self.num_micro_batches = num_micro_batches
        self.compute_timer = IntervalTimer(device)  # this rank's stages' forward, backward and loss
        self.loss = PipelineLoss(device, self.compute_timer)
        # Shapes given up front (static metadata): the library would otherwise infer them with
        # an extra forward on uninitialised buffers, which also moves BatchNorm statistics and
        # the dropout RNG away from a run without pipelining.
        pipe_stages = [TimedStage(m, s, num_stages, device, group=mesh["pp"].get_group(),
                                  input_args=stage_inputs(m, cfg, mesh["tp"].size()),
                                  output_args=stage_outputs(m, cfg, mesh["tp"].size()),
                                  timer=self.compute_timer)
                       for m, s in zip(stages, stage_ids)]
        schedule = cfg.pipeline_schedule
        if schedule == "zero_bubble":
            self.schedule = ScheduleInterleavedZeroBubble(pipe_stages, num_micro_batches,
                                                          loss_fn=self.loss, scale_grads=False)
        elif len(pipe_stages) > 1:
            self.schedule = ScheduleInterleaved1F1B(pipe_stages, num_micro_batches,
                                                    loss_fn=self.loss, scale_grads=False)
        else:
            self.schedule = Schedule1F1B(pipe_stages[0], num_micro_batches, loss_fn=self.loss,
                                         scale_grads=False)

    def _inputs(self, micro_batches: list[dict], num_image_tokens: int):
        batch = {k: torch.cat([b[k] for b in micro_batches]) for k in micro_batches[0]}
        S = batch["tokens"].shape[1]
        target = torch.stack([batch["labels"], batch["loss_mask"].long(),
                              batch["task_id"][:, None].expand(-1, S)], dim=1)
        kwargs = dict(prefix_len=batch["prefix_len"], valid_len=batch["valid_len"],
                      has_image=batch["has_image"],
                      positions=text_positions(batch["has_image"], S, num_image_tokens))
        args = (batch["tokens"], batch["images"]) if self.is_first else ()
        return args, kwargs, target

    def forward_backward(self, micro_batches: list[dict], cfg: ModelConfig, scale: torch.Tensor) -> LossSums:
        """Run the schedule; returns the step's loss sums on every pipeline rank."""
        args, kwargs, target = self._inputs(micro_batches, cfg.num_image_tokens)
        self.loss.reset()
        self.loss.scale, self.loss.aux_scale = scale, 1.0 / len(micro_batches)
        self.schedule.step(*args, target=target, **kwargs)
        return self._loss_sums()

    @torch.no_grad()
    def evaluate(self, micro_batches: list[dict], cfg: ModelConfig) -> LossSums:
        args, kwargs, target = self._inputs(micro_batches, cfg.num_image_tokens)
        self.loss.reset()
        with self.compute_timer.paused():  # the bubble is of training steps
            self.schedule.eval(*args, target=target, **kwargs)
        return self._loss_sums()

    def _loss_sums(self) -> LossSums:
        """The loss sums of the last run, on every pipeline rank (only the last stage has them)."""
        flat = self.loss.sums.to_tensor()
        dist.all_reduce(flat, group=self.pp_group)
        return LossSums.from_tensor(flat)


def _hidden(cfg: RunConfig, tp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden states, aux) of one micro-batch between stages, split along the sequence under
    sequence parallelism; both carry gradients back."""
    seq = cfg.seq_length // tp if cfg.sequence_parallel else cfg.seq_length
    return (torch.empty(cfg.micro_batch_size, seq, cfg.model.hidden_size, device="meta", requires_grad=True,
                        dtype=compute_dtype(cfg.bf16, cfg.params_dtype)),
            torch.empty(1, dtype=PARAMS_DTYPES[cfg.params_dtype], device="meta", requires_grad=True))


def stage_inputs(stage: M6, cfg: RunConfig, tp: int) -> tuple[torch.Tensor, ...]:
    if stage.embedding is not None:
        b, s, size = cfg.micro_batch_size, cfg.seq_length, cfg.model.image_size
        return (torch.empty(b, s, dtype=torch.long, device="meta"),
                torch.empty(b, 3, size, size, dtype=PARAMS_DTYPES[cfg.params_dtype], device="meta"))
    return _hidden(cfg, tp)


def stage_outputs(stage: M6, cfg: RunConfig, tp: int) -> tuple[torch.Tensor, ...]:
    if stage.lm_head is not None:  # vocabulary-parallel logits stay on this rank for the loss
        logits = torch.empty(cfg.micro_batch_size, cfg.seq_length, cfg.model.vocab_size // tp, device="meta",
                             dtype=compute_dtype(cfg.bf16, cfg.params_dtype))
        return logits, torch.empty(1, dtype=PARAMS_DTYPES[cfg.params_dtype], device="meta", requires_grad=True)
    return _hidden(cfg, tp)


def build_pipeline_stages(model: M6, cfg: RunConfig, pp_rank: int, pp: int) -> tuple[list[int], list[M6]]:
    """This rank's stage indices and stage modules, cut from a (meta-device) model."""
    ids = stages_of_rank(pp_rank, pp, cfg.model.num_layers, cfg.num_layers_per_virtual_pipeline_stage)
    num_stages = pp * len(ids)
    return ids, [pipeline_stage(model, s, num_stages, cfg) for s in ids]


def tied_embedding_group(mesh: DeviceMesh, timeout: timedelta) -> dist.ProcessGroup | None:
    """The process group of this rank and its peer holding the other copy of the tied embedding
    (first and last pipeline stage, same data/expert/tensor coordinates); every rank creates
    every such group, in the same order, as new_group requires."""
    ranks = mesh.mesh  # [pp, edp, ep, tp] global ranks
    mine = None
    for coords in torch.cartesian_prod(*(torch.arange(n) for n in ranks.shape[1:])).reshape(-1, 3).tolist():
        edp, ep, tp = coords
        pair = [int(ranks[0, edp, ep, tp]), int(ranks[-1, edp, ep, tp])]
        group = dist.new_group(pair, timeout=timeout)
        if dist.get_rank() in pair:
            mine = group
    return mine
