"""Decode speed inside the context window and past it: the context shift against re-prefilling the window.

  python bench/bench_generate.py                          # the bench_model config, a 256-token window
  python bench/bench_generate.py --threads 1 --clock cpu  # on a machine shared with other jobs

Greedy generation at batch 1, three ways, each timed eager and with the compiled one-token step
(model.compile_decode(), what model_sample.py --chat and serve.py use):
  inside      a 32-token prompt, --new-tokens more: the whole generation fits the window;
  re-prefill  a prompt that fills the window, then --new-tokens more the way generate went past the window
              before the context shift: every token re-prefills the last max_seq_len tokens (rebuilt here from
              the step-wise API: new_caches, prefill);
  shift       the same prompt through model.generate: the context shift (support/model/context_shift.py) frees
              half the window at a time and decoding goes on with the cache.
Decode tokens/s leaves the prompt out: (n - 1) / (time for n new tokens - time for 1). Rounds alternate the
variants in one process; the table shows medians and each way's speed against inside the window.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common import add_clock_flags, clock_of, interleaved, machine_line  # noqa: E402
from k_model import ModelConfig, Transformer  # noqa: E402

WAYS = ("inside", "re-prefill", "shift")
MODEL_SHAPE = {"dim": 512, "n-layers": 8, "n-heads": 8, "n-kv-heads": 4, "vocab-size": 6144}  # bench_model.py's


@torch.inference_mode()
def reprefill_generate(model: Transformer, prompt: torch.Tensor, n: int) -> None:
    """Greedy, every token predicted by prefilling the last max_seq_len tokens (the prompt fills the window)."""
    window = model.config.max_seq_len
    caches = model.new_caches(prompt.shape[0], prompt.device)
    seq = prompt
    with model.packed_weights():
        for _ in range(n):
            last = seq[:, -window:]
            logits, _, _ = model.prefill(last, torch.ones_like(last, dtype=torch.bool), caches)
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)


def generate_fns(model: Transformer, new_tokens: int, seed: int) -> dict[tuple[str, int], Callable[[], None]]:
    """For each way, generating 1 and new_tokens tokens (their difference is the decoding alone)."""
    window, vocab = model.config.max_seq_len, model.config.vocab_size
    full = torch.randint(0, vocab, (1, window), generator=torch.Generator().manual_seed(seed))
    short = full[:, :32]
    ways = {"inside": lambda n: model.generate(short, n, temperature=0),
            "re-prefill": lambda n: reprefill_generate(model, full, n),
            "shift": lambda n: model.generate(full, n, temperature=0)}
    return {(way, n): (lambda fn=fn, n=n: fn(n)) for way, fn in ways.items() for n in (1, new_tokens)}


def decode_rates(model: Transformer, args: argparse.Namespace, clock) -> dict[str, float]:
    fns = generate_fns(model, args.new_tokens, args.seed)
    times = {key: statistics.median(t) for key, t in interleaved(fns, args.rounds, 1, "cpu", clock).items()}
    return {way: (args.new_tokens - 1) / (times[way, args.new_tokens] - times[way, 1]) for way in WAYS}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, default in MODEL_SHAPE.items():
        p.add_argument(f"--{flag}", type=int, default=default)
    p.add_argument("--max-seq-len", type=int, default=256, help="the context window")
    p.add_argument("--new-tokens", type=int, default=192, help="tokens generated (inside: 32 + this must fit)")
    p.add_argument("--rounds", type=int, default=3)
    add_clock_flags(p)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if 32 + args.new_tokens > args.max_seq_len:
        p.error(f"--new-tokens {args.new_tokens}: inside the window needs 32 + new tokens <= --max-seq-len")
    clock = clock_of(args)
    torch.manual_seed(args.seed)
    cfg = ModelConfig(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                      vocab_size=args.vocab_size, max_seq_len=args.max_seq_len)
    model = Transformer(cfg).eval()
    load_start = os.getloadavg()[0]
    print(f"# {machine_line('cpu')}", flush=True)
    rows = {"eager": decode_rates(model, args, clock)}
    model.compile_decode()
    rows["compiled step"] = decode_rates(model, args, clock)

    print(f"\nconfig: dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads / {cfg.n_kv_heads} kv heads, "
          f"vocab {cfg.vocab_size}, {model.num_params() / 1e6:.1f}M params, window {cfg.max_seq_len}; batch 1, "
          f"greedy, {args.new_tokens} new tokens, float32; medians of {args.rounds} interleaved rounds, "
          f"{args.clock} clock")
    header = ("decode step", "inside tok/s", "past, re-prefill tok/s", "re-prefill/inside", "past, shift tok/s",
              "shift/inside")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, r in rows.items():
        print(f"| {name} | {r['inside']:,.0f} | {r['re-prefill']:,.0f} | {r['re-prefill'] / r['inside']:.2f}x | "
              f"{r['shift']:,.0f} | {r['shift'] / r['inside']:.2f}x |")
    print(f"machine: {machine_line('cpu')}")
    print(f"load average (1 min) at start {load_start:.2f}, at end {os.getloadavg()[0]:.2f}, on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
