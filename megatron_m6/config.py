"""All configuration in one place: dataclasses for the model and the run, presets, and the
Megatron-style command line that fills them.

`parse_args()` turns flags into a `RunConfig`; every check of it lives here and rejects an
impossible configuration with one clear line (`ConfigError`) before any work starts: `validate()`
when the flags are read, `validate_layout()` once the world size is known (parallel_dims calls it).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Literal, get_args

from megatron_m6.data.blending import parse_blend, parse_split
from megatron_m6.data.indexed import dataset_exists
from megatron_m6.data.task_spec import FINETUNE_TASKS, TASK_NAMES, min_seq_length


class ConfigError(ValueError):
    """An impossible or contradictory configuration; its message is one line for the user."""


# The enumerated settings; the command line's choices are read from these, and so are the kernel
# backends model/attention.py and model/moe.py dispatch on (ATTENTION_BACKENDS, MOE_DISPATCH_BACKENDS).
PositionEmbeddingType = Literal["learned_absolute", "rope"]
AttentionBackend = Literal["auto", "fused", "sdpa", "flex"]
MoeDispatchBackend = Literal["auto", "fused", "torch"]
LrDecayStyle = Literal["cosine", "linear", "constant"]
ParamsDtype = Literal["float32", "float64"]  # the keys of precision.PARAMS_DTYPES
Device = Literal["auto", "cpu", "cuda"]
DataParallelSharding = Literal["replicate", "optimizer", "full"]
RecomputeGranularity = Literal["selective", "full"]
PipelineSchedule = Literal["1f1b", "zero_bubble"]


@dataclass
class ModelConfig:
    """Hyperparameters of the M6 network (what a checkpoint's config.json records)."""

    vocab_size: int = 21128
    hidden_size: int = 1024
    num_layers: int = 24
    num_attention_heads: int = 16
    ffn_hidden_size: int = 4096
    max_position_embeddings: int = 512
    position_embedding_type: PositionEmbeddingType = "learned_absolute"
    rotary_base: float = 10000.0
    layernorm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    untie_embeddings_and_output_weights: bool = False
    # Image side: a ResNet whose last feature map cells become the image tokens.
    image_size: int = 224
    resnet_layers: tuple[int, ...] = (3, 4, 6, 3)  # ResNet-50
    resnet_bottleneck: bool = True
    resnet_width: int = 64
    # Mixture of Experts (num_experts == 0 means dense).
    num_experts: int = 0
    moe_layer_freq: int = 1
    moe_router_topk: int = 2
    moe_capacity_factor: float | None = None  # None: dropless
    moe_aux_loss_coeff: float = 1e-2
    moe_z_loss_coeff: float = 0.0
    moe_expert_prototypes: int = 1  # k groups, top-1 in each (M6-T); 1 disables
    moe_ffn_hidden_size: int | None = None
    # Kernels: how the model computes, not what. "auto": fused Triton kernels on CUDA, PyTorch
    # elsewhere; see megatron_m6/model/attention.py and moe.py.
    attention_backend: AttentionBackend = "auto"
    moe_dispatch_backend: MoeDispatchBackend = "auto"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def image_grid(self) -> int:
        """Side of the last ResNet feature map: the image is downsampled 32x."""
        return math.ceil(self.image_size / 32)

    @property
    def num_image_tokens(self) -> int:
        return self.image_grid**2

    @property
    def expert_ffn_hidden_size(self) -> int:
        return self.moe_ffn_hidden_size or self.ffn_hidden_size

    def is_moe_layer(self, layer_number: int) -> bool:
        """Every `moe_layer_freq`-th layer (1-based: layers freq, 2*freq, ...) is an MoE layer."""
        return self.num_experts > 0 and layer_number % self.moe_layer_freq == 0


@dataclass
class RunConfig:
    """Everything `pretrain` needs: the model, the optimisation, the data and the bookkeeping."""

    model: ModelConfig = field(default_factory=ModelConfig)
    preset: str | None = None
    # Batch and schedule.
    seq_length: int = 512
    micro_batch_size: int = 4
    global_batch_size: int = 4
    train_iters: int = 100
    lr: float = 1e-4
    min_lr: float = 0.0
    lr_warmup_iters: int = 0
    lr_decay_style: LrDecayStyle = "cosine"
    lr_decay_iters: int | None = None
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    bf16: bool = False
    params_dtype: ParamsDtype = "float32"  # float64: reference precision, for checking layouts
    seed: int = 1234
    # Data.
    data_path: list[str] | None = None  # Megatron's: PREFIX, or W1 PREFIX1 W2 PREFIX2 ...
    split: str = "98,2,0"  # train/valid/test shares of every dataset's documents
    vocab_file: str | None = None  # None: the vocabulary shipped with megatron_m6
    mock_data: bool = False
    task_weights: dict[str, float] = field(default_factory=dict)
    num_workers: int = 0
    # Checkpoints and logging.
    save: str | None = None
    load: str | None = None
    save_interval: int | None = None
    exit_interval: int | None = None  # save and stop when the iteration is a multiple of this
    exit_signal_handler: bool = False  # on SIGTERM/SIGUSR1: finish the step, save, exit 0
    exit_duration_in_mins: float | None = None  # save and stop once training has run this long
    async_save: bool = False  # write checkpoints in the background while training goes on
    keep_last: int | None = None  # checkpoints to keep under --save (None: all)
    eval_interval: int | None = None
    eval_iters: int = 10
    log_interval: int = 10
    peak_tflops: float | None = None  # MFU's denominator per GPU (default: device table or measured)
    tensorboard_dir: str | None = None
    log_timers_to_tensorboard: bool = False
    device: Device = "auto"
    # Speed: compilation, and where the time and memory go (megatron_m6/training/profiling.py).
    compile: bool = False  # torch.compile each transformer block
    profile: bool = False
    profile_step_start: int = 10  # torch.profiler records steps start .. end - 1
    profile_step_end: int = 12
    profile_ranks: list[int] = field(default_factory=lambda: [0])
    profile_dir: str | None = None  # default: --tensorboard-dir, else ./profiles
    record_memory_history: bool = False  # CUDA allocator history, dumped as a snapshot
    memory_snapshot_step: int | None = None  # the step after which the snapshot is dumped
    # Parallelism: data parallel is what remains of the world size (see megatron_m6/parallel).
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    sequence_parallel: bool = False
    data_parallel_sharding: DataParallelSharding = "replicate"  # optimizer: ZeRO-2-like; full: FSDP
    overlap_grad_reduce: bool = False
    recompute_granularity: RecomputeGranularity | None = None
    num_layers_per_virtual_pipeline_stage: int | None = None
    pipeline_schedule: PipelineSchedule = "1f1b"  # interleaved with virtual stages
    distributed_timeout_minutes: float = 10.0  # a collective that waits longer fails (and dumps a trace)
    # Fine-tuning (python -m megatron_m6.finetune; megatron_m6/data/downstream.py has the tasks).
    task: str | None = None  # caption, vqa, itm, text_generation or text_to_image
    train_data: str | None = None  # jsonl of the task
    valid_data: str | None = None
    pretrained_checkpoint: str | None = None  # weights to start from when --load holds none
    finetune: bool = False  # --load's weights only: fresh optimizer, schedule and iteration count
    no_load_optim: bool = False
    no_load_rng: bool = False
    epochs: float | None = None  # instead of --train-iters
    save_best: bool = False  # keep the checkpoint of the best validation metric in SAVE/best
    max_bad_fraction: float = 0.0  # rows whose image cannot be used, skipped up to this share
    text_only: bool = False  # drop the images: the baseline that shows the image is used
    image_tokenizer: str | None = None  # text_to_image: its codes become tokens after the text vocabulary
    # Dry run: build one rank's real layout of a `world_size` job on the meta device, check it, exit.
    dry_run: bool = False
    world_size: int | None = None
    rank: int | None = None

    def micro_batches_per_rank(self, dp_size: int = 1) -> int:
        """Micro-batches each of `dp_size` data-parallel ranks runs per step (gradient
        accumulation; a pipeline's schedule length)."""
        return self.global_batch_size // (self.micro_batch_size * dp_size)


PRESETS: dict[str, dict] = {
    # CPU demo: a few layers and a small ResNet on 96 px images (3x3 = 9 image tokens).
    "m6-tiny": dict(
        model=dict(hidden_size=128, num_layers=4, num_attention_heads=4, ffn_hidden_size=512,
                   max_position_embeddings=64, image_size=96, resnet_layers=(1, 1, 1, 1),
                   resnet_bottleneck=False, resnet_width=32),
        run=dict(seq_length=64, micro_batch_size=16, global_batch_size=32),
    ),
    # The paper's base model.
    "m6-base": dict(
        model=dict(hidden_size=1024, num_layers=24, num_attention_heads=16, ffn_hidden_size=4096,
                   max_position_embeddings=512),
        run=dict(seq_length=512),
    ),
    # Dense 10B: 12 * L * h^2 with L=48, h=4096 gives 9.7B in the blocks, plus embeddings and ResNet.
    "m6-10b": dict(
        model=dict(hidden_size=4096, num_layers=48, num_attention_heads=32, ffn_hidden_size=16384,
                   max_position_embeddings=512),
        run=dict(seq_length=512),
    ),
    # MoE 100B: m6-base's trunk with 512 experts in every layer, top-2 routing.
    "m6-100b": dict(
        model=dict(hidden_size=1024, num_layers=24, num_attention_heads=16, ffn_hidden_size=4096,
                   max_position_embeddings=512, num_experts=512, moe_layer_freq=1,
                   moe_router_topk=2, moe_capacity_factor=1.25),
        run=dict(seq_length=512),
    ),
}

def build_parser() -> argparse.ArgumentParser:
    """Megatron-LM's flag names; every flag defaults to None, so `config_from_args` can tell what
    was given from what the preset and the dataclasses supply."""
    p = argparse.ArgumentParser(
        description="Pretrain M6 (Megatron-style flags).", allow_abbrev=False)
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="start from a preset's model and sequence length; flags given override "
                        "it, but may not contradict its architecture")
    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=int, help="transformer blocks")
    g.add_argument("--hidden-size", type=int, help="width of the residual stream")
    g.add_argument("--num-attention-heads", type=int, help="attention heads (must divide --hidden-size)")
    g.add_argument("--ffn-hidden-size", type=int, help="inner width of the MLP")
    g.add_argument("--max-position-embeddings", type=int,
                   help="learned positions (default: at least --seq-length)")
    g.add_argument("--vocab-size", type=int,
                   help="embedding rows with --mock-data (real data takes the --vocab-file's size, "
                        "padded to a multiple of 128)")
    g.add_argument("--position-embedding-type", choices=get_args(PositionEmbeddingType),
                   help="learned_absolute (the paper's) or rope")
    g.add_argument("--rotary-base", type=float, help="base of the rotary frequencies (with rope)")
    g.add_argument("--init-method-std", type=float, help="std of the normal weight initialisation")
    g.add_argument("--hidden-dropout", type=float, help="dropout on the embeddings and each block's residual branches")
    g.add_argument("--attention-dropout", type=float, help="dropout on the attention probabilities")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true", default=None,
                   help="an LM head of its own instead of the token embedding's")
    g.add_argument("--image-size", type=int,
                   help="side of the square input image in pixels; every 32 px is a row of image tokens")
    g.add_argument("--resnet-layers", type=str, help="blocks per ResNet stage, e.g. 3,4,6,3 (ResNet-50)")
    g.add_argument("--resnet-bottleneck", action=argparse.BooleanOptionalAction, default=None,
                   help="bottleneck blocks as in ResNet-50 (the default), or basic blocks "
                        "(--no-resnet-bottleneck, as in m6-tiny)")
    g.add_argument("--resnet-width", type=int, help="channels of the first ResNet stage (64 in ResNet-50)")
    g.add_argument("--num-experts", type=int, help="experts per MoE layer (0, the default: dense)")
    g.add_argument("--moe-layer-freq", type=int, help="every N-th block's MLP is an MoE layer")
    g.add_argument("--moe-router-topk", type=int, help="experts each token is routed to")
    g.add_argument("--moe-expert-prototypes", type=int,
                   help="k groups of experts with top-1 routing in each (M6-T); 1 disables")
    g.add_argument("--moe-ffn-hidden-size", type=int, help="inner width of an expert (default --ffn-hidden-size)")
    g.add_argument("--moe-aux-loss-coeff", type=float, help="weight of the load-balancing loss")
    g.add_argument("--moe-z-loss-coeff", type=float, help="weight of the router z-loss (0 disables)")
    g.add_argument("--moe-capacity-factor", type=float,
                   help="expert capacity as a multiple of the even share; omit for dropless")
    g.add_argument("--moe-dropless", action="store_true", default=None,
                   help="no capacity limit (overrides a preset's capacity factor)")
    g.add_argument("--attention-backend", choices=get_args(AttentionBackend),
                   help="auto: the fused Triton kernel for bf16/fp16 on CUDA, else sdpa")
    g.add_argument("--moe-dispatch-backend", choices=get_args(MoeDispatchBackend),
                   help="auto: fused Triton gating/permute/unpermute on CUDA, else torch")
    g = p.add_argument_group("training")
    g.add_argument("--seq-length", type=int, help="tokens per sample, image tokens included")
    g.add_argument("--micro-batch-size", type=int, help="samples per forward and backward on one rank")
    g.add_argument("--global-batch-size", type=int,
                   help="samples per optimizer step over all data-parallel ranks (the rest is "
                        "gradient accumulation)")
    g.add_argument("--train-iters", type=int, help="optimizer steps")
    g.add_argument("--lr", type=float, help="peak learning rate")
    g.add_argument("--min-lr", type=float, help="learning rate at the end of the decay")
    g.add_argument("--lr-warmup-iters", type=int, help="steps of linear warm-up to --lr")
    g.add_argument("--lr-decay-style", choices=get_args(LrDecayStyle), help="decay after the warm-up")
    g.add_argument("--lr-decay-iters", type=int, help="steps until --min-lr is reached (default --train-iters)")
    g.add_argument("--weight-decay", type=float, help="AdamW's decoupled weight decay")
    g.add_argument("--clip-grad", type=float, help="largest global gradient norm")
    g.add_argument("--adam-beta1", type=float, help="AdamW's first-moment decay")
    g.add_argument("--adam-beta2", type=float, help="AdamW's second-moment decay")
    g.add_argument("--adam-eps", type=float, help="AdamW's epsilon")
    g.add_argument("--seed", type=int, help="seeds the weights, the data order and dropout")
    g.add_argument("--bf16", action="store_true", default=None,
                   help="bf16 autocast over fp32 master weights (the policy: megatron_m6/precision.py)")
    g.add_argument("--params-dtype", choices=get_args(ParamsDtype),
                   help="master weights and all arithmetic; float64 is a reference-precision run "
                        "in which every layout reproduces one process to float64 rounding")
    g.add_argument("--device", choices=get_args(Device),
                   help="auto: this rank's GPU when CUDA is available, else the CPU")
    g.add_argument("--log-interval", type=int, help="steps between log lines")
    g.add_argument("--peak-tflops", type=float,
                   help="peak TFLOP/s of one device in the compute dtype, for the logged MFU (default: a table of "
                        "known GPUs, else a matmul timed at start-up)")
    g.add_argument("--log-timers-to-tensorboard", action="store_true", default=None,
                   help="also write the data-wait, forward-backward, optimizer and bubble times "
                        "to TensorBoard (they are always in the log line)")
    g.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile each transformer block (the fused attention kernel is a "
                        "graph break)")
    g.add_argument("--profile", action="store_true", default=None,
                   help="record a torch.profiler trace (TensorBoard or Perfetto) of steps "
                        "--profile-step-start .. --profile-step-end - 1")
    g.add_argument("--profile-step-start", type=int, help="first profiled step (default 10)")
    g.add_argument("--profile-step-end", type=int, help="the step at which profiling stops (default 12)")
    g.add_argument("--profile-ranks", type=int, nargs="+", help="global ranks that profile (default 0)")
    g.add_argument("--profile-dir", type=str,
                   help="folder for traces and memory snapshots (default: --tensorboard-dir, else ./profiles)")
    g.add_argument("--record-memory-history", action="store_true", default=None,
                   help="CUDA only: record the allocator's history and dump a snapshot at "
                        "--memory-snapshot-step and on out-of-memory (open at pytorch.org/memory_viz)")
    g.add_argument("--memory-snapshot-step", type=int,
                   help="with --record-memory-history: dump the snapshot after this step "
                        "(default: only on out-of-memory)")
    g.add_argument("--eval-interval", type=int,
                   help="steps between validations on the --split's validation share")
    g.add_argument("--eval-iters", type=int, help="micro-batches per rank in one validation")
    g.add_argument("--num-workers", type=int, help="data loader processes per rank (they decode images)")
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int,
                   help="ranks that split attention, MLP and vocabulary (Megatron's column/row split)")
    g.add_argument("--pipeline-model-parallel-size", type=int, help="pipeline stages")
    g.add_argument("--expert-model-parallel-size", type=int,
                   help="ranks the experts are sharded over, carved out of data parallel")
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int,
                   help="layers per virtual stage: several stages per rank, interleaved")
    g.add_argument("--pipeline-schedule", choices=get_args(PipelineSchedule),
                   help="1f1b is interleaved 1F1B with --num-layers-per-virtual-pipeline-stage; "
                        "zero_bubble is the interleaved zero-bubble schedule")
    g.add_argument("--sequence-parallel", action="store_true", default=None,
                   help="norms and the residual stream split along the sequence (needs tensor parallel)")
    g.add_argument("--data-parallel-sharding", choices=get_args(DataParallelSharding),
                   help="replicate: all-reduce; optimizer: FSDP2 without reshard after forward "
                        "(ZeRO-2-like); full: FSDP2")
    g.add_argument("--overlap-grad-reduce", action="store_true", default=None,
                   help="with replicate: all-reduce gradients in buckets during the backward")
    g.add_argument("--recompute-granularity", choices=get_args(RecomputeGranularity),
                   help="recompute in the backward: selective (attention) or full (whole blocks)")
    g.add_argument("--distributed-timeout-minutes", type=float,
                   help="fail a collective that waits longer than this (default 10)")
    g.add_argument("--dry-run", action="store_true", default=None,
                   help="build the layout of rank --rank in a --world-size job on the meta device "
                        "over a fake process group, check it, print its sizes and exit")
    g.add_argument("--world-size", type=int, help="with --dry-run: the job's number of ranks")
    g.add_argument("--rank", type=int, help="with --dry-run: the rank to build")
    g = p.add_argument_group("data and checkpoints")
    g.add_argument("--data-path", nargs="+",
                   help="indexed dataset prefix, or W1 PREFIX1 W2 PREFIX2 ... (text and image-text "
                        "datasets from tools/preprocess_data.py)")
    g.add_argument("--split", type=str, help="train,valid,test shares of documents (default 98,2,0)")
    g.add_argument("--vocab-file", type=str, help="vocab.txt (default: the shipped vocabulary)")
    g.add_argument("--mock-data", action="store_true", default=None,
                   help="synthetic batches of the configured shapes")
    g.add_argument("--task-weights", type=str,
                   help="e.g. text_denoising=1,prefix_lm=1,captioning=2 (default: all equal); "
                        f"tasks: {', '.join(TASK_NAMES)}")
    g.add_argument("--save", type=str, help="folder the checkpoints are written to")
    g.add_argument("--load", type=str, help="checkpoint folder to resume from")
    g.add_argument("--save-interval", type=int, help="steps between checkpoints")
    g.add_argument("--exit-interval", type=int,
                   help="save and exit 0 at the first iteration that is a multiple of this")
    g.add_argument("--exit-signal-handler", action="store_true", default=None,
                   help="on SIGTERM or SIGUSR1 finish the current step, save and exit 0")
    g.add_argument("--exit-duration-in-mins", type=float,
                   help="save and exit 0 once training has run this many minutes")
    g.add_argument("--async-save", action="store_true", default=None,
                   help="copy the state to CPU memory and write it in the background")
    g.add_argument("--keep-last", type=int, metavar="N",
                   help="keep only the newest N complete checkpoints under --save")
    g.add_argument("--tensorboard-dir", type=str, help="folder for TensorBoard event files")
    g.add_argument("--no-load-optim", action="store_true", default=None,
                   help="with --load: the weights, a fresh optimizer state")
    g.add_argument("--no-load-rng", action="store_true", default=None,
                   help="with --load: keep this run's RNG streams")
    g = p.add_argument_group("fine-tuning (python -m megatron_m6.finetune)")
    g.add_argument("--task", choices=FINETUNE_TASKS, help="the downstream task")
    g.add_argument("--train-data", type=str,
                   help="jsonl of the task (images relative to the file, data: URIs or base64), or the "
                        "prefix of its indexed dataset (tools/preprocess_data.py --task) for large sets")
    g.add_argument("--valid-data", type=str, help="the same, for the validation loss and the task's metric every "
                                                  "--eval-interval (itm's metric needs the jsonl)")
    g.add_argument("--pretrained-checkpoint", type=str,
                   help="checkpoint or release (tools/checkpoint/convert.py to-release) whose weights fine-tuning "
                        "starts from, under any layout (when --load holds no checkpoint yet)")
    g.add_argument("--finetune", action="store_true", default=None,
                   help="load only --load's weights: fresh optimizer, schedule and iteration count")
    g.add_argument("--epochs", type=float, help="passes over --train-data (instead of --train-iters)")
    g.add_argument("--save-best", action="store_true", default=None,
                   help="keep the checkpoint with the best validation metric in SAVE/best")
    g.add_argument("--max-bad-fraction", type=float,
                   help="skip rows whose image is missing or unreadable, up to this share (default 0)")
    g.add_argument("--text-only", action="store_true", default=None,
                   help="drop every image: the text-only baseline")
    g.add_argument("--image-tokenizer", type=str,
                   help="text_to_image: the image tokenizer (tools/train_image_tokenizer.py --save) whose codes "
                        "--train-data holds; its [BOI], [EOI] and code tokens follow the text vocabulary")
    return p


MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}


def parse_task_weights(text: str) -> dict[str, float]:
    """--task-weights NAME=W,NAME=W,... -> {name: weight}; unknown tasks are an error here."""
    weights = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        name = name.strip()
        if name not in TASK_NAMES:
            raise ConfigError(f"--task-weights: unknown task {name!r}; tasks are {', '.join(TASK_NAMES)}")
        try:
            weights[name] = float(value)
        except ValueError:
            raise ConfigError(f"--task-weights: {item!r} is not NAME=NUMBER") from None
    return weights


def config_from_args(ns: argparse.Namespace) -> RunConfig:
    """Preset first, then every flag given explicitly; a flag that contradicts the preset's
    architecture is an error rather than a silent override."""
    cfg = RunConfig()
    given = {k: v for k, v in vars(ns).items() if v is not None and k != "preset"}
    if ns.preset:
        preset = PRESETS[ns.preset]
        for k, v in preset["model"].items():
            if k in given and k in {"hidden_size", "num_layers", "num_attention_heads",
                                    "ffn_hidden_size", "num_experts"} and given[k] != v:
                raise ConfigError(f"--{k.replace('_', '-')} {given[k]} contradicts --preset "
                                  f"{ns.preset} ({k}={v}); drop one of them")
            setattr(cfg.model, k, v)
        for k, v in preset["run"].items():
            setattr(cfg, k, v)
        cfg.preset = ns.preset
    if given.pop("moe_dropless", False):
        cfg.model.moe_capacity_factor = None
        given.pop("moe_capacity_factor", None)
    if "resnet_layers" in given:
        try:
            given["resnet_layers"] = tuple(int(x) for x in given["resnet_layers"].split(","))
        except ValueError:
            raise ConfigError("--resnet-layers must be integers separated by commas") from None
    if "task_weights" in given:
        given["task_weights"] = parse_task_weights(given["task_weights"])
    for k, v in given.items():
        if k in MODEL_FIELDS:
            setattr(cfg.model, k, v)
        else:
            setattr(cfg, k, v)
    if "max_position_embeddings" not in given and not ns.preset:
        cfg.model.max_position_embeddings = max(cfg.model.max_position_embeddings, cfg.seq_length)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Reject impossible configurations with one clear message before any work starts."""
    m = cfg.model
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError(f"--num-attention-heads {m.num_attention_heads} does not divide "
                          f"--hidden-size {m.hidden_size}")
    if m.position_embedding_type == "rope" and m.head_dim % 2:
        raise ConfigError(f"rotary embeddings need an even head dimension, got {m.head_dim}")
    if cfg.task_weights and sum(cfg.task_weights.values()) <= 0:
        raise ConfigError("--task-weights must have a positive total")
    if any(w < 0 for w in cfg.task_weights.values()):
        raise ConfigError("--task-weights must not be negative")
    for task in used_tasks(cfg):
        need = min_seq_length(task, m.num_image_tokens)
        if cfg.seq_length < need:
            raise ConfigError(f"--seq-length {cfg.seq_length} is too short for {task}: it needs "
                              f"{need} ({m.num_image_tokens} image tokens, special tokens and text)")
    if cfg.seq_length > m.max_position_embeddings:
        raise ConfigError(f"--seq-length {cfg.seq_length} exceeds --max-position-embeddings "
                          f"{m.max_position_embeddings}")
    if m.num_experts < 0:
        raise ConfigError("--num-experts must be >= 0")
    if m.num_experts:
        if m.moe_router_topk < 1 or m.moe_router_topk > m.num_experts:
            raise ConfigError(f"--moe-router-topk {m.moe_router_topk} must be between 1 and "
                              f"--num-experts {m.num_experts}")
        if m.moe_expert_prototypes < 1 or m.num_experts % m.moe_expert_prototypes:
            raise ConfigError(f"--moe-expert-prototypes {m.moe_expert_prototypes} must divide "
                              f"--num-experts {m.num_experts}")
        if m.moe_expert_prototypes > 1 and m.moe_router_topk != m.moe_expert_prototypes:
            raise ConfigError("expert prototyping routes top-1 in each of k groups: set "
                              "--moe-router-topk equal to --moe-expert-prototypes")
        if m.moe_layer_freq < 1 or m.moe_layer_freq > m.num_layers:
            raise ConfigError(f"--moe-layer-freq {m.moe_layer_freq} must be between 1 and "
                              f"--num-layers {m.num_layers}")
        if m.moe_capacity_factor is not None and m.moe_capacity_factor <= 0:
            raise ConfigError("--moe-capacity-factor must be positive (omit it for dropless)")
    if len(m.resnet_layers) != 4 or min(m.resnet_layers) < 1:
        raise ConfigError("--resnet-layers needs four positive block counts, e.g. 3,4,6,3")
    if cfg.micro_batch_size < 1 or cfg.global_batch_size % cfg.micro_batch_size:
        raise ConfigError(f"--global-batch-size {cfg.global_batch_size} must be a multiple of "
                          f"--micro-batch-size {cfg.micro_batch_size}")
    if cfg.bf16 and cfg.params_dtype == "float64":
        raise ConfigError("--bf16 and --params-dtype float64 contradict each other; drop one")
    if cfg.train_iters < 1:
        raise ConfigError("--train-iters must be at least 1")
    if cfg.min_lr > cfg.lr:
        raise ConfigError(f"--min-lr {cfg.min_lr} is above --lr {cfg.lr}")
    if cfg.task is not None:
        validate_finetune(cfg)
    elif not cfg.mock_data and not cfg.dry_run:  # a dry run builds the layout and reads no data
        validate_data(cfg)
    if cfg.keep_last is not None and cfg.keep_last < 1:
        raise ConfigError(f"--keep-last {cfg.keep_last} must be at least 1")
    if (cfg.async_save or cfg.keep_last) and not cfg.save:
        raise ConfigError("--async-save and --keep-last need --save")
    if (cfg.exit_signal_handler or cfg.exit_duration_in_mins is not None) and not cfg.save and not cfg.dry_run:
        raise ConfigError("--exit-signal-handler and --exit-duration-in-mins save a checkpoint "
                          "before exiting: give --save DIR")
    if cfg.exit_duration_in_mins is not None and cfg.exit_duration_in_mins <= 0:
        raise ConfigError("--exit-duration-in-mins must be positive")
    if cfg.distributed_timeout_minutes <= 0:
        raise ConfigError("--distributed-timeout-minutes must be positive")
    if cfg.peak_tflops is not None and cfg.peak_tflops <= 0:
        raise ConfigError("--peak-tflops must be positive")
    if cfg.log_timers_to_tensorboard and not cfg.tensorboard_dir:
        raise ConfigError("--log-timers-to-tensorboard needs --tensorboard-dir")
    if cfg.profile:
        if not 1 <= cfg.profile_step_start < cfg.profile_step_end:
            raise ConfigError(f"--profile-step-start {cfg.profile_step_start} and --profile-step-end "
                              f"{cfg.profile_step_end}: need 1 <= start < end (steps start .. end - 1 are traced)")
        if cfg.profile_step_start > cfg.train_iters:
            raise ConfigError(f"--profile-step-start {cfg.profile_step_start} is after the last step "
                              f"(--train-iters {cfg.train_iters}): nothing would be profiled")
        if not cfg.profile_ranks or min(cfg.profile_ranks) < 0:
            raise ConfigError("--profile-ranks needs one or more ranks >= 0")
    if cfg.memory_snapshot_step is not None:
        if not cfg.record_memory_history:
            raise ConfigError("--memory-snapshot-step needs --record-memory-history")
        if cfg.memory_snapshot_step < 1:
            raise ConfigError("--memory-snapshot-step must be at least 1")
    if cfg.dry_run and (cfg.world_size is None or cfg.rank is None):
        raise ConfigError("--dry-run needs --world-size N and --rank R")
    if (cfg.world_size is not None or cfg.rank is not None) and not cfg.dry_run:
        raise ConfigError("--world-size and --rank are for --dry-run (torchrun sets them otherwise)")
    if cfg.dry_run and not (cfg.world_size >= 1 and 0 <= cfg.rank < cfg.world_size):
        raise ConfigError(f"--rank {cfg.rank} is not in [0, --world-size {cfg.world_size})")
    if cfg.load is not None and not os.path.isdir(cfg.load) and not (cfg.task and cfg.pretrained_checkpoint):
        raise ConfigError(f"--load {cfg.load} does not exist")  # fine-tuning starts from its pretrained one


def used_tasks(cfg: RunConfig) -> list[str]:
    """The tasks a run draws samples of: those of positive --task-weights (all by default; all
    with --mock-data, whose synthetic samples ignore the weights)."""
    if cfg.mock_data or not cfg.task_weights:
        return list(TASK_NAMES)
    return [t for t in TASK_NAMES if cfg.task_weights.get(t, 0.0) > 0]


def validate_layout(cfg: RunConfig, world_size: int) -> None:
    """Reject a parallel layout that `world_size` ranks cannot hold, once the world size is known
    (parallel/mesh.py's parallel_dims runs this before building the mesh)."""
    m = cfg.model
    tp, pp, ep = (cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size,
                  cfg.expert_model_parallel_size)
    if min(tp, pp, ep) < 1:
        raise ConfigError("parallel sizes must be at least 1")
    if world_size % (tp * pp):
        raise ConfigError(f"world size {world_size} is not divisible by tensor ({tp}) x pipeline "
                          f"({pp}) parallel size")
    dp = world_size // (tp * pp)  # data parallel is what remains
    virtual = cfg.num_layers_per_virtual_pipeline_stage
    checks = [
        (m.num_attention_heads % tp, f"--num-attention-heads {m.num_attention_heads} is not divisible by TP {tp}"),
        (m.ffn_hidden_size % tp, f"--ffn-hidden-size {m.ffn_hidden_size} is not divisible by TP {tp}"),
        (m.vocab_size % tp, f"vocabulary size {m.vocab_size} is not divisible by TP {tp}"),
        (m.num_layers % pp, f"--num-layers {m.num_layers} is not divisible by {pp} pipeline stages"),
        (ep > 1 and not m.num_experts, f"--expert-model-parallel-size {ep} needs --num-experts"),
        (m.num_experts % ep, f"--num-experts {m.num_experts} is not divisible by EP {ep}"),
        (dp % ep, f"EP {ep} does not divide data-parallel size {dp}"),
        (cfg.sequence_parallel and tp == 1, "--sequence-parallel needs --tensor-model-parallel-size > 1"),
        (cfg.sequence_parallel and cfg.seq_length % tp,
         f"--seq-length {cfg.seq_length} is not divisible by TP {tp} (sequence parallel)"),
        (virtual and pp == 1, "--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1"),
        (virtual and m.num_layers % (pp * virtual),
         f"--num-layers {m.num_layers} is not divisible by {pp} stages x {virtual} layers per virtual stage"),
        (cfg.global_batch_size % (cfg.micro_batch_size * dp),
         f"--global-batch-size {cfg.global_batch_size} is not a multiple of --micro-batch-size "
         f"{cfg.micro_batch_size} x data-parallel size {dp}"),
        (cfg.profile and max(cfg.profile_ranks) >= world_size,
         f"--profile-ranks {' '.join(map(str, cfg.profile_ranks))}: the job has ranks 0 .. {world_size - 1}"),
    ]
    for failed, message in checks:
        if failed:
            raise ConfigError(message)
    micro_per_rank = cfg.micro_batches_per_rank(dp)
    if pp > 1 and micro_per_rank % pp:
        raise ConfigError(f"{micro_per_rank} micro-batches per step per data-parallel rank must be a "
                          f"multiple of the {pp} pipeline stages (raise --global-batch-size)")


def validate_data(cfg: RunConfig) -> None:
    """--data-path names complete indexed datasets, --split and --vocab-file make sense."""
    if not cfg.data_path:
        raise ConfigError("give --data-path (PREFIX or W1 PREFIX1 W2 PREFIX2 ..., indexed datasets "
                          "from tools/preprocess_data.py) or --mock-data")
    try:
        blend = parse_blend(cfg.data_path)
        parse_split(cfg.split)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for _, prefix in blend:
        if not dataset_exists(prefix):
            raise ConfigError(f"--data-path {prefix}: {prefix}.bin/.idx does not exist (build it "
                              "with tools/preprocess_data.py)")
    if cfg.vocab_file is not None and not os.path.isfile(cfg.vocab_file):
        raise ConfigError(f"--vocab-file {cfg.vocab_file} does not exist")


FINETUNE_ONLY = ("train_data", "valid_data", "pretrained_checkpoint", "finetune", "epochs", "save_best",
                 "max_bad_fraction", "text_only", "image_tokenizer")


def validate_finetune(cfg: RunConfig) -> None:
    """A fine-tuning run: its data files, its starting point and its epochs make sense."""
    if cfg.mock_data or cfg.data_path:
        raise ConfigError("fine-tuning reads --train-data and --valid-data, not --data-path or --mock-data")
    if not cfg.train_data:
        raise ConfigError(f"--task {cfg.task} needs --train-data (a jsonl of the task or its indexed dataset)")
    for flag, path in (("--train-data", cfg.train_data), ("--valid-data", cfg.valid_data)):
        if path is not None and not (os.path.isfile(path) or dataset_exists(path)):
            raise ConfigError(f"{flag} {path} does not exist (neither a file nor an indexed dataset's "
                              "PREFIX.idx and PREFIX.bin)")
    if cfg.vocab_file is not None and not os.path.isfile(cfg.vocab_file):
        raise ConfigError(f"--vocab-file {cfg.vocab_file} does not exist")
    if cfg.pretrained_checkpoint is not None and not os.path.isdir(cfg.pretrained_checkpoint):
        raise ConfigError(f"--pretrained-checkpoint {cfg.pretrained_checkpoint} does not exist")
    if cfg.finetune and not cfg.load:
        raise ConfigError("--finetune loads --load's weights: give --load DIR (or use --pretrained-checkpoint)")
    if cfg.epochs is not None and cfg.epochs <= 0:
        raise ConfigError("--epochs must be positive")
    if cfg.save_best and not (cfg.save and cfg.valid_data and cfg.eval_interval):
        raise ConfigError("--save-best needs --save, --valid-data and --eval-interval")
    if not 0 <= cfg.max_bad_fraction < 1:
        raise ConfigError(f"--max-bad-fraction must be in [0, 1), got {cfg.max_bad_fraction}")
    if (cfg.task == "text_to_image") != (cfg.image_tokenizer is not None):
        raise ConfigError("--task text_to_image needs --image-tokenizer, and only it takes one")
    if cfg.image_tokenizer is not None and not os.path.exists(cfg.image_tokenizer):
        raise ConfigError(f"--image-tokenizer {cfg.image_tokenizer} does not exist")
    if cfg.task == "text_to_image" and cfg.text_only:
        raise ConfigError("--text-only drops input images; text_to_image has none to drop")


def parse_args(argv: list[str] | None = None, entry: str = "pretrain") -> RunConfig:
    """The RunConfig of `argv` for `entry`, "pretrain" or "finetune" (which needs --task and
    takes the fine-tuning flags); any impossible setting is a ConfigError."""
    cfg = config_from_args(build_parser().parse_args(argv))
    if entry == "finetune" and cfg.task is None:
        raise ConfigError(f"give --task ({', '.join(FINETUNE_TASKS)})")
    if entry == "pretrain":
        given = [k for k in ("task",) + FINETUNE_ONLY if getattr(cfg, k) != getattr(RunConfig, k)]
        if given:
            raise ConfigError(f"--{given[0].replace('_', '-')} is a fine-tuning flag: "
                              "run python -m megatron_m6.finetune")
    validate(cfg)
    return cfg
