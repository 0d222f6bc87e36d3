"""k_model.Transformer, eager and compiled, against transformers' LlamaForCausalLM (sdpa) on the same weights.

  python bench/bench_model.py                      # CPU (and CUDA when present), default config
  python bench/bench_model.py --threads 1 --clock cpu   # on a machine shared with other jobs

Three variants, one model each, all with the same weights (HF's is to_hf_llama(ours)) and the same inputs:
  ours eager      k_model as it is;
  ours compiled   training: torch.compile(model), what the trainer's --compile does;
                  decoding: model.compile_decode(), the compiled one-token step (what model_sample.py --chat
                  and serve.py use);
  HF Llama        LlamaForCausalLM, forward with labels / generate.
(a) train step: forward + backward + AdamW step (fused, as the trainer's, for every variant), tokens/s, and the
    peak memory the step allocates on top of the model and optimizer state (CUDA: allocator statistics; CPU:
    rise of the peak resident set);
(b) decode: greedy, 32-token prompt, 256 new tokens, at batch 1 and batch 8, tokens/s and in parentheses
    the share of the memory-bandwidth limit: a step reads every weight once, so
    (tokens/s / batch) x weight bytes / measured read bandwidth (KV-cache reads not counted).
float32, plus bf16 where the hardware computes it natively (CUDA, CPUs with AVX512_BF16 / AMX): autocast
for training, bf16 weights for decoding. "compile s" = the compiled variant's first call minus a timed
one (inductor keeps compiled kernels on disk: a second run of the bench compiles faster).
Rounds alternate the variants (A B C A B C ...) in one process so drifting machine load hits all alike;
the table shows medians, and beside each ratio the middle half of the rounds' own ratios (how far the
machine's noise moves it). Greedy tokens are compared: float32 variants should agree; bf16 rounding may flip
an argmax of this random-weight model, and a row says so when tokens differ.
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common import add_clock_flags, clock_of, interleaved, machine_line, peak_memory, read_bandwidth  # noqa: E402
from support.model.hf_llama import to_hf_llama  # noqa: E402
from k_model import ModelConfig, Transformer  # noqa: E402
from support.model import cpu_matmul  # noqa: E402
from support.model.cpu_features import cpu_has_native_bf16  # noqa: E402

VARIANTS = ("ours eager", "ours compiled", "HF Llama")


def build(cfg: ModelConfig, device: str, dtype: torch.dtype, seed: int) -> dict[str, torch.nn.Module]:
    """The three variants' models, identical weights."""
    torch.manual_seed(seed)
    ours = Transformer(cfg).to(device=device, dtype=dtype)
    twin = Transformer(cfg).to(device=device, dtype=dtype)
    twin.load_state_dict(ours.state_dict())
    return dict(zip(VARIANTS, (ours, twin, to_hf_llama(ours))))


def random_tokens(shape: tuple[int, int], vocab: int, device: str, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed)).to(device)


def train_fns(models, batch: int, seq: int, autocast_dtype, device: str, seed: int):
    """One optimizer step per variant. HF gets labels = inputs and shifts them itself, as a user calls it."""
    window = random_tokens((batch, seq + 1), models["ours eager"].config.vocab_size, device, seed)
    x, y = window[:, :-1], window[:, 1:]
    ctx = (lambda: torch.autocast(device, dtype=autocast_dtype)) if autocast_dtype else contextlib.nullcontext
    losses = {
        "ours eager": lambda: models["ours eager"](x, y).last_loss.mean(),
        "ours compiled": (lambda step: lambda: step(x, y).last_loss.mean())(torch.compile(models["ours compiled"])),
        "HF Llama": lambda: models["HF Llama"](input_ids=x, labels=x).loss,
    }

    def step_fn(name):
        model, loss_fn = models[name].train(), losses[name]
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # the trainer's optimizer, for all

        def step():
            opt.zero_grad(set_to_none=True)
            with ctx():
                loss = loss_fn()
            loss.backward()
            opt.step()

        return step

    return {name: step_fn(name) for name in VARIANTS}


def decode_fns(models, batch: int, prompt_len: int, new_tokens: int, device: str, seed: int):
    """Greedy generation per variant; the tokens each produced land in the returned dict."""
    prompt = random_tokens((batch, prompt_len), models["ours eager"].config.vocab_size, device, seed)
    gen = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
    mask = torch.ones_like(prompt)
    models["ours compiled"].compile_decode()
    out = {}

    def ours(name):
        def fn():
            out[name] = models[name].eval().generate(prompt, new_tokens, temperature=0)
        return fn

    def hf():
        with torch.inference_mode():
            out["HF Llama"] = models["HF Llama"].eval().generate(prompt, attention_mask=mask,
                                                                  generation_config=gen)[:, prompt_len:]

    return {"ours eager": ours("ours eager"), "ours compiled": ours("ours compiled"), "HF Llama": hf}, out


def run(fns, rounds: int, device: str, clock) -> tuple[dict[str, float], dict[str, str], float]:
    """Median seconds per call of each variant, the spread of each of ours against HF (ratio_spread), and the
    compiled variant's compile seconds (its first call, timed on the wall clock, minus its median)."""
    first = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - t0
    per_round = interleaved(fns, rounds, 0, device, clock)
    times = {name: statistics.median(t) for name, t in per_round.items()}
    spread = {name: ratio_spread(per_round["HF Llama"], per_round[name]) for name in VARIANTS[:2]}
    return times, spread, first["ours compiled"] - times["ours compiled"]


def ratio_spread(hf_seconds: list[float], ours_seconds: list[float]) -> str:
    """The middle half (interquartile range) of the per-round speed ratios HF time / our time. Each round times
    the variants back to back, so a round's ratio is the one least touched by the machine's drift; how widely
    they scatter says how far the median ratio can be trusted (on a shared 2-core VM, +-10% and more)."""
    ratios = [h / o for h, o in zip(hf_seconds, ours_seconds)]
    low, _, high = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
    return f"({low:.2f}-{high:.2f})"


def tokens_differ(out: dict[str, torch.Tensor]) -> str:
    """'' when every variant decoded the same tokens, else which ones differ from ours eager."""
    ref = out["ours eager"]
    differ = [name for name in VARIANTS[1:] if not torch.equal(out[name], ref)]
    return f" ({', '.join(differ)}: tokens differ)" if differ else ""


def row(benchmark, device, dtype, shape, values: dict[str, float], target, compile_s, fmt=None, spread=None):
    """One table row: the three variants' values, each of ours against HF (with its per-round spread when
    timed), the target, compile seconds."""
    fmt = fmt or (lambda name, v: f"{v:,.0f}")
    spread = spread or dict.fromkeys(VARIANTS[:2], "")
    ratios = [f"{values[name] / values['HF Llama']:.2f}x {spread[name]}".strip() if values["HF Llama"] else "-"
              for name in VARIANTS[:2]]
    return (benchmark, device, dtype, shape, *(fmt(n, values[n]) for n in VARIANTS), *ratios, target,
            f"{compile_s:.1f}")


def train_variants(cfg: ModelConfig, args, device: str, dtype_name: str) -> dict:
    """The three variants' train steps on fresh models: float32 weights, bf16 autocast for the bf16 rows."""
    autocast = torch.bfloat16 if dtype_name == "bf16" else None
    return train_fns(build(cfg, device, torch.float32, args.seed), args.batch_size, args.seq_len, autocast, device,
                     args.seed)


def train_row(cfg: ModelConfig, args, device: str, dtype_name: str, clock) -> tuple:
    """Train tokens/s of the three variants. Everything built here is freed on return: models and
    optimizers kept alive from an earlier row slowed the next row's eager variants (HF's bf16 step by 20%)."""
    times, spread, compile_s = run(train_variants(cfg, args, device, dtype_name), args.rounds, device, clock)
    tps = {n: args.batch_size * args.seq_len / t for n, t in times.items()}
    name = "train tok/s (autocast)" if dtype_name == "bf16" else "train tok/s"
    return row(name, device, dtype_name, f"{args.batch_size}x{args.seq_len}", tps, ">= 1.5x", compile_s,
               spread=spread)


def memory_row(cfg: ModelConfig, args, device: str, dtype_name: str) -> tuple | None:
    """Peak memory of one train step per variant, after a first step (compiling, the optimizer state); the
    smaller of two steps, as the first one measured can include one-time allocations."""
    fns = train_variants(cfg, args, device, dtype_name)
    for fn in fns.values():
        fn()
    peaks = {name: [peak_memory(fn, device) for _ in range(2)] for name, fn in fns.items()}
    if any(None in p for p in peaks.values()):
        return None
    mib = {n: min(p) / 2**20 for n, p in peaks.items()}
    shape = f"{args.batch_size}x{args.seq_len}"
    return row("train peak MiB", device, dtype_name, shape, mib, "lower", 0.0, lambda n, v: f"{v:,.1f}")[:-1] + ("-",)


def decode_row(cfg: ModelConfig, args, device: str, dtype_name: str, batch: int, bandwidth: float, clock) -> tuple:
    """Decode tokens/s of the three variants, with each one's share of the bandwidth limit."""
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    models = build(cfg, device, dtype, args.seed)
    weight_bytes = models["ours eager"].num_params() * dtype.itemsize
    fns, out = decode_fns(models, batch, args.prompt_len, args.new_tokens, device, args.seed)
    times, spread, compile_s = run(fns, args.decode_rounds, device, clock)
    tps = {n: batch * args.new_tokens / t for n, t in times.items()}
    share = lambda n, v: f"{v:,.0f} ({v / batch * weight_bytes / bandwidth:.0%})"  # noqa: E731
    return row("decode tok/s" + tokens_differ(out), device, dtype_name, f"{batch}x({args.prompt_len}+{args.new_tokens})",
               tps, ">= 2x", compile_s, share, spread)


def matmul_libraries_line() -> str:
    """Both float32 matmul libraries timed on this CPU (the measurement cpu_matmul chooses by), and the choice
    this run uses."""
    timed = cpu_matmul.time_libraries()
    shown = "; ".join(f"{shapes}: " + ", ".join(f"{lib} {s * 1e3:.2f} ms" for lib, s in libs.items())
                      for shapes, libs in timed.items())
    return f"{cpu_matmul.describe_choice()} | timed now: {shown}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--n-layers", type=int, default=8)
    p.add_argument("--n-heads", type=int, default=8)
    p.add_argument("--n-kv-heads", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=6144)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4, help="train step batch")
    p.add_argument("--seq-len", type=int, default=256, help="train step sequence length")
    p.add_argument("--rounds", type=int, default=5, help="timed train rounds per variant (after one warm-up)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--decode-batches", default="1,8", help="comma list of decode batch sizes")
    p.add_argument("--decode-rounds", type=int, default=3)
    p.add_argument("--dtypes", default="auto",
                   help="comma list of fp32,bf16; auto = fp32, plus bf16 where it is native (CUDA, AVX512_BF16/AMX "
                        "CPUs: elsewhere bf16 matmul is emulated, 20-90x slower than fp32)")
    p.add_argument("--devices", default="auto", help="comma list of cpu,cuda; auto = cpu plus cuda when present")
    add_clock_flags(p)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    clock = clock_of(args)
    if args.devices == "auto":
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        devices = args.devices.split(",")
    if args.clock == "cpu" and "cuda" in devices:
        p.error("--clock cpu measures host CPU time; it means nothing for CUDA kernels (use --devices cpu)")
    cfg = ModelConfig(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                      vocab_size=args.vocab_size, max_seq_len=max(args.max_seq_len, args.prompt_len + args.new_tokens))
    n_params = Transformer(cfg).num_params()
    load_start = os.getloadavg()[0]
    table, memory_rows, notes = [], [], []
    for device in devices:
        print(f"# {machine_line(device)}", flush=True)
        if device == "cpu":
            print(f"# {matmul_libraries_line()}", flush=True)
        native_bf16 = device == "cuda" or cpu_has_native_bf16()
        dtypes = ["fp32", "bf16"] if native_bf16 else ["fp32"]
        dtypes = dtypes if args.dtypes == "auto" else args.dtypes.split(",")
        bandwidth = read_bandwidth(device)
        notes.append(f"{device} read bandwidth {bandwidth / 1e9:.1f} GB/s (best of 5 sums over 512 MB)")
        for dtype_name in dtypes:
            table.append(train_row(cfg, args, device, dtype_name, clock))
            print(f"  {table[-1]}", flush=True)
            memory_rows.append((len(table), device, dtype_name))
        for dtype_name in dtypes:
            for batch in map(int, args.decode_batches.split(",")):
                table.append(decode_row(cfg, args, device, dtype_name, batch, bandwidth, clock))
                print(f"  {table[-1]}", flush=True)
    # after all timing: measuring memory changes how glibc allocates for the rest of the process
    for at, device, dtype_name in reversed(memory_rows):
        mib_row = memory_row(cfg, args, device, dtype_name)
        if mib_row:
            table.insert(at, mib_row)

    print()
    print(f"config: dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads / {cfg.n_kv_heads} kv heads, "
          f"ffn {cfg.hidden_dim}, vocab {cfg.vocab_size}, {n_params / 1e6:.1f}M params; medians of "
          f"{args.rounds} (train) / {args.decode_rounds} (decode) interleaved rounds, {args.clock} clock; "
          f"ratios of the medians, in parentheses the middle half of the rounds' own ratios")
    header = ("benchmark", "device", "dtype", "shape", *VARIANTS, "eager/HF", "compiled/HF", "target", "compile s")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in table:
        print("| " + " | ".join(r) + " |")
    for device in devices:
        print(f"machine: {machine_line(device)}")
    for note in notes:
        print(note)
    # other processes on the same cores skew every number (all variants, but not equally): show how busy it was
    print(f"load average (1 min) at start {load_start:.2f}, at end {os.getloadavg()[0]:.2f}, on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
