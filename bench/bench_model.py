"""k_model.Transformer vs transformers' LlamaForCausalLM (sdpa) on the same config and weights.

  python bench/bench_model.py                      # CPU (and CUDA when present), default config
  python bench/bench_model.py --dim 768 --n-layers 12 --batch-size 8 --rounds 7

(a) train step tokens/s: forward + backward + AdamW step, float32 and bf16 autocast;
(b) decode tokens/s: batch 1, greedy, 32-token prompt, 256 new tokens; ours.generate vs HF generate.
Both models start from the same weights (HF's is to_hf_llama(ours)) and see the same random tokens;
rounds alternate ours / HF (A B A B ...) in one process so drifting machine load hits both; medians.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import torch
from transformers import GenerationConfig

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import interleaved, machine_line  # noqa: E402
from k_model import ModelConfig, Transformer, to_hf_llama  # noqa: E402


def build(cfg: ModelConfig, device: str, seed: int):
    torch.manual_seed(seed)
    ours = Transformer(cfg).to(device)
    return ours, to_hf_llama(ours)


def train_step_fns(ours, hf, batch: int, seq: int, autocast_dtype, device: str, seed: int):
    """One optimizer step each. HF gets labels = inputs and shifts them itself, as a user would call it."""
    g = torch.Generator().manual_seed(seed)
    window = torch.randint(0, ours.config.vocab_size, (batch, seq + 1), generator=g).to(device)
    x, y = window[:, :-1], window[:, 1:]
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4)
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-4)
    ctx = (lambda: torch.autocast(device, dtype=autocast_dtype)) if autocast_dtype else contextlib.nullcontext

    def step_ours():
        opt_ours.zero_grad(set_to_none=True)
        with ctx():
            loss = ours(x, y).last_loss.mean()
        loss.backward()
        opt_ours.step()

    def step_hf():
        opt_hf.zero_grad(set_to_none=True)
        with ctx():
            loss = hf(input_ids=x, labels=x).loss
        loss.backward()
        opt_hf.step()

    return {"ours": step_ours, "hf": step_hf}


def decode_fns(ours, hf, prompt_len: int, new_tokens: int, device: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, ours.config.vocab_size, (1, prompt_len), generator=g).to(device)
    gen = GenerationConfig(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    mask = torch.ones_like(prompt)
    out = {}

    def dec_ours():
        out["ours"] = ours.generate(prompt, new_tokens, temperature=0)

    def dec_hf():
        with torch.inference_mode():
            out["hf"] = hf.generate(prompt, attention_mask=mask, generation_config=gen)[:, prompt_len:]

    return {"ours": dec_ours, "hf": dec_hf}, out


def row(table, name, device, dtype, shape, tokens, times, target, flops_per_token=None):
    """Appends medians as tokens/s, their ratio, each side's slowest-fastest round, and for training the
    model FLOP/s ours achieves (flops_per_token * tokens/s: how close the step is to the hardware peak)."""
    ours, theirs = (tokens / statistics.median(times[k]) for k in ("ours", "hf"))
    spread = lambda k: f"{tokens / max(times[k]):,.0f}-{tokens / min(times[k]):,.0f}"  # noqa: E731
    gflops = f"{ours * flops_per_token / 1e9:,.1f}" if flops_per_token else "-"
    table.append((name, device, dtype, shape, f"{ours:,.0f}", f"{theirs:,.0f}", f"{ours / theirs:.2f}x", target,
                  f"{spread('ours')} / {spread('hf')}", str(len(times["ours"])), gflops))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--n-layers", type=int, default=8)
    p.add_argument("--n-heads", type=int, default=8)
    p.add_argument("--n-kv-heads", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=6144)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256, help="train step sequence length")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per variant (after one warm-up)")
    p.add_argument("--bf16-shape", default="auto",
                   help="BxT for the bf16-autocast train row; auto = the fp32 shape where bf16 matmul is fast "
                        "(CUDA, AVX512-BF16/AMX CPUs), else 1x64 with 2 rounds: on AVX2-only CPUs bf16 matmul "
                        "is emulated and ~20-90x slower than fp32")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--decode-rounds", type=int, default=3)
    p.add_argument("--devices", default="auto", help="comma list of cpu,cuda; auto = cpu plus cuda when present")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: elapsed time (the number that matters); cpu: this process's CPU time, for a CPU "
                        "shared with other jobs - with --threads 1 it approximates the time on an idle machine")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    if args.devices == "auto":
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        devices = args.devices.split(",")
    if args.clock == "cpu" and "cuda" in devices:
        p.error("--clock cpu measures host CPU time; it means nothing for CUDA kernels (use --devices cpu)")
    cfg = ModelConfig(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                      vocab_size=args.vocab_size, max_seq_len=max(args.max_seq_len, args.prompt_len + args.new_tokens))
    load_start = os.getloadavg()[0]
    table = []
    for device in devices:
        print(f"# {machine_line(device)}", flush=True)
        fast_bf16 = device == "cuda" or torch.backends.cpu.get_cpu_capability() in ("AVX512_BF16", "AMX")
        shapes = [("fp32", None, args.batch_size, args.seq_len, args.rounds)]
        if args.bf16_shape == "auto" and not fast_bf16:
            shapes.append(("bf16 autocast", torch.bfloat16, 1, 64, 2))
        else:
            b, t = (args.batch_size, args.seq_len) if args.bf16_shape == "auto" else map(int, args.bf16_shape.split("x"))
            shapes.append(("bf16 autocast", torch.bfloat16, b, t, args.rounds))
        for dtype_name, autocast, batch, seq, rounds in shapes:
            ours, hf = build(cfg, device, args.seed)
            fns = train_step_fns(ours.train(), hf.train(), batch, seq, autocast, device, args.seed)
            times = interleaved(fns, rounds, warmup=1, device=device, clock=clock)
            row(table, "train step tok/s", device, dtype_name, f"{batch}x{seq}", batch * seq, times, ">= 1.25x",
                ours.flops_per_token(seq))
            print(f"  {table[-1]}", flush=True)
        decode_dtypes = [("fp32", torch.float32)] + ([("bf16", torch.bfloat16)] if fast_bf16 else [])
        for dtype_name, dtype in decode_dtypes:
            ours, hf = build(cfg, device, args.seed)
            ours, hf = ours.to(dtype).eval(), hf.to(dtype).eval()
            fns, out = decode_fns(ours, hf, args.prompt_len, args.new_tokens, device, args.seed)
            times = interleaved(fns, args.decode_rounds, warmup=1, device=device, clock=clock)
            same = torch.equal(out["ours"], out["hf"])
            row(table, "decode tok/s" + ("" if same else " (tokens differ!)"), device, dtype_name,
                f"1x({args.prompt_len}+{args.new_tokens})", args.new_tokens, times, ">= 1.0x")
            print(f"  {table[-1]}", flush=True)

    n_params = Transformer(cfg).num_params()
    print()
    print(f"config: dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads / {cfg.n_kv_heads} kv heads, "
          f"ffn {cfg.hidden_dim}, vocab {cfg.vocab_size}, {n_params / 1e6:.1f}M params; medians of interleaved rounds, "
          f"{args.clock} clock")
    header = ("benchmark", "device", "dtype", "shape", "ours", "HF Llama", "ours/HF", "target", "range ours / HF",
              "rounds", "ours GFLOP/s")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in table:
        print("| " + " | ".join(r) + " |")
    for device in devices:
        print(f"machine: {machine_line(device)}")
    # other processes on the same cores skew every number (both sides, but not equally): show how busy it was
    print(f"load average (1 min) at start {load_start:.2f}, at end {os.getloadavg()[0]:.2f}, on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
