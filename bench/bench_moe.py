"""Mixture of experts against the dense model with the same active parameters per token (docs/moe.md).

  python bench/bench_moe.py                              # the demo's shape: dim 128, 4 layers, 4 experts, top-1
  python bench/bench_moe.py --experts 8 --top-k 2        # each expert then has half the dense hidden width
  python bench/bench_moe.py --threads 1 --clock cpu      # on a machine shared with other jobs

Both models have the same dim, layers and attention; the dense feed-forward is hidden_dim wide, each of the
MoE's experts hidden_dim / top_k, so a token computes with the same feed-forward weights in both (plus the MoE's
router). The MoE holds experts / top_k times the feed-forward weights.
(a) train step: forward + backward + AdamW step (fused), with the router losses, tokens/s;
(b) decode: greedy, 32-token prompt, --new-tokens new tokens, eager KV-cache decoding, tokens/s.
float32 on the CPU. Rounds alternate the two models (A B A B ...) in one process; the table shows medians and
MoE / dense.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common import add_clock_flags, clock_of, interleaved, machine_line  # noqa: E402
from k_model import ModelConfig, Transformer  # noqa: E402
from support.model.grouped_mm import GROUPED_MM  # noqa: E402


def models(args: argparse.Namespace) -> dict[str, Transformer]:
    shape = dict(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                 vocab_size=args.vocab_size, max_seq_len=max(args.seq_len, 32 + args.new_tokens))
    dense = ModelConfig(**shape)
    moe = ModelConfig(**shape, hidden_dim=dense.hidden_dim // args.top_k, num_local_experts=args.experts,
                      num_experts_per_tok=args.top_k)
    torch.manual_seed(0)
    return {"dense": Transformer(dense), "MoE": Transformer(moe)}


def train_fns(built: dict[str, Transformer], args: argparse.Namespace) -> dict:
    tokens = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len + 1))
    x, y = tokens[:, :-1], tokens[:, 1:]

    def step_of(model: Transformer):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        model.train()

        def step() -> None:
            out = model(x, y)
            loss = out.last_loss.mean() + (out.router_loss if out.router_loss is not None else 0)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step
    return {name: step_of(model) for name, model in built.items()}


def decode_fns(built: dict[str, Transformer], batch: int, args: argparse.Namespace) -> dict:
    prompt = torch.randint(0, args.vocab_size, (batch, 32))
    return {name: (lambda m=model: m.eval().generate(prompt, args.new_tokens, temperature=0))
            for name, model in built.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--n-kv-heads", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--decode-rounds", type=int, default=3)
    p.add_argument("--decode-batches", default="1,8")
    add_clock_flags(p)
    args = p.parse_args()
    clock = clock_of(args)
    built = models(args)
    grouped = "yes" if GROUPED_MM else "no (one matmul per expert)"
    print(f"machine: {machine_line('cpu')} | torch._grouped_mm: {grouped}")
    for name, m in built.items():
        cfg = m.config
        experts = f" x {cfg.num_local_experts} experts, top-{cfg.num_experts_per_tok}" if cfg.num_local_experts else ""
        print(f"{name}: {m.num_params() / 1e6:.2f}M params, {m.active_params() / 1e6:.2f}M active per token, "
              f"feed-forward hidden {cfg.hidden_dim}{experts}")
    rows = []
    times = interleaved(train_fns(built, args), args.rounds, warmup=2, device="cpu", clock=clock)
    tokens = args.batch_size * args.seq_len
    rows.append(("train tok/s", f"{args.batch_size}x{args.seq_len}", {k: tokens / statistics.median(v)
                                                                     for k, v in times.items()}))
    for batch in (int(b) for b in args.decode_batches.split(",")):
        times = interleaved(decode_fns(built, batch, args), args.decode_rounds, warmup=1, device="cpu", clock=clock)
        rows.append(("decode tok/s", f"{batch}x(32+{args.new_tokens})",
                     {k: batch * args.new_tokens / statistics.median(v) for k, v in times.items()}))
    print(f"| what | shape | dense | MoE | MoE / dense |  ({args.clock} clock, medians)")
    print("|---|---|---:|---:|---:|")
    for what, shape, r in rows:
        print(f"| {what} | {shape} | {r['dense']:,.0f} | {r['MoE']:,.0f} | {r['MoE'] / r['dense']:.2f}x |")


if __name__ == "__main__":
    main()
