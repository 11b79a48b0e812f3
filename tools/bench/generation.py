"""KV-cache generation throughput: tokens/s of megatron_m6.inference.generate on a randomly
initialised model, at several batch sizes, beside one run without the cache at the first batch size.

    python tools/bench/generation.py                       # m6-base; a GPU in bf16 when there is one
    python tools/bench/generation.py --preset m6-tiny --batch-sizes 1 4 --new-tokens 16 --json /tmp/g.json

Greedy decoding of text prompts (`[CLS] source [SEP]`, random source tokens), with an EOS id that
is no token, so every row writes all `--new-tokens` (a random model would stop at random places).
tokens/s counts generated tokens, the prefill included in the time. The no-cache row also says
whether its tokens equal the cached run's: the same greedy continuation, unless two logits tie
within the dtype's rounding (tests/test_generate.py checks the equality exactly, in float64).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path[:0] = [REPO, os.path.join(REPO, "kernels")]

import torch  # noqa: E402

from megatron_m6.config import parse_args  # noqa: E402
from megatron_m6.inference import SamplingConfig, generate  # noqa: E402
from megatron_m6.model import M6  # noqa: E402
from megatron_m6.tokenizer.tokenizer import SPECIAL_TOKENS  # noqa: E402

NO_EOS = -1  # no token has this id: generation runs to max_new_tokens


def prompts(batch: int, prompt_len: int, vocab: int, device: torch.device) -> torch.Tensor:
    """[CLS] source [SEP] rows of `prompt_len` tokens, the source drawn from the non-special ids."""
    cls, sep = SPECIAL_TOKENS.index("[CLS]"), SPECIAL_TOKENS.index("[SEP]")
    g = torch.Generator().manual_seed(batch)
    source = torch.randint(len(SPECIAL_TOKENS), vocab, (batch, prompt_len - 2), generator=g)
    return torch.cat([torch.full((batch, 1), cls), source, torch.full((batch, 1), sep)], 1).to(device)


def timed_generate(model: M6, tokens: torch.Tensor, cfg: SamplingConfig, use_cache: bool,
                   repeat: int) -> tuple[float, list[list[int]]]:
    """(median seconds of `repeat` runs after one warm-up, the generated tokens)."""
    def run() -> tuple[float, list[list[int]]]:
        if tokens.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = generate(model, tokens, None, None, NO_EOS, cfg, use_cache=use_cache)
        if tokens.is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start, out

    run()
    runs = [run() for _ in range(repeat)]
    return statistics.median(s for s, _ in runs), runs[-1][1]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="m6-base")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    p.add_argument("--prompt-len", type=int, default=32, help="tokens per prompt, [CLS] and [SEP] included")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeat", type=int, default=3, help="timed runs per row (the median is reported)")
    p.add_argument("--json", metavar="PATH", help="also write the rows here, as a JSON list of dicts")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available here")
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model_cfg = parse_args(["--preset", args.preset, "--mock-data"]).model
    room = model_cfg.max_position_embeddings - args.prompt_len
    if args.prompt_len < 3 or room < 1 or args.new_tokens < 1 or args.repeat < 1 or min(args.batch_sizes) < 1:
        p.error(f"need --prompt-len >= 3 below max_position_embeddings {model_cfg.max_position_embeddings}, "
                "and positive --new-tokens, --repeat and --batch-sizes")
    new_tokens = min(args.new_tokens, room)
    torch.manual_seed(0)
    model = M6(model_cfg).to(device=device, dtype=dtype).eval()
    cfg = SamplingConfig(max_new_tokens=new_tokens)
    print(f"{args.preset} on {device} in {str(dtype).removeprefix('torch.')}, torch {torch.__version__}: "
          f"prompts of {args.prompt_len} tokens, {new_tokens} new tokens, greedy")

    rows = []
    cached_first = None
    for batch, use_cache in [(b, True) for b in args.batch_sizes] + [(args.batch_sizes[0], False)]:
        tokens = prompts(batch, args.prompt_len, model_cfg.vocab_size, device)
        seconds, out = timed_generate(model, tokens, cfg, use_cache, args.repeat)
        generated = sum(len(r) for r in out)
        row = dict(device=str(device), torch=torch.__version__, dtype=str(dtype).removeprefix("torch."),
                   preset=args.preset, batch=batch, prompt_len=args.prompt_len, new_tokens=new_tokens,
                   use_cache=use_cache, seconds=seconds, tokens_per_s=generated / seconds,
                   ms_per_token_step=1000 * seconds / new_tokens)
        if use_cache and cached_first is None:
            cached_first = out
        if not use_cache:
            row["same_tokens_as_cached"] = out == cached_first
        rows.append(row)
        print(f"batch {batch:3d} {'KV cache' if use_cache else 'no cache'}: {row['tokens_per_s']:9.1f} tokens/s, "
              f"{row['ms_per_token_step']:.2f} ms per step")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
