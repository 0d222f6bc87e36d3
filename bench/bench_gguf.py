"""Decoding speed: llama.cpp on the exported GGUF files beside our model, same prompt, same threads.

  python bench/bench_gguf.py                                     # out/sft, f32 and q8_0 files, 2 threads
  python bench/bench_gguf.py --model out/pretrain --outtypes f32,f16,q8_0 --threads 1 --new-tokens 128

The model (any source open_model opens) is exported with export_gguf's writer to a temporary directory, one
file per --outtypes, and each file is loaded by llama.cpp (the xllamacpp wheel, a CPU build, in this process).
Each variant decodes the same prompt greedily for --new-tokens tokens (llama.cpp with ignore_eos, ours with no
stop token, so all produce the same count); a call includes the prompt's prefill. Variants:
  ours eager      k_model's generate as it is (float32);
  ours compiled   after compile_decode() (--compile; compiling takes tens of seconds);
  llama.cpp TYPE  llama.cpp's /completion on the TYPE file (its KV cache f16, flash attention auto: its defaults).
Rounds alternate the variants (A B C A B C ...) in one process; the table shows medians, each variant's speed
relative to ours eager, and how many of its tokens equal ours up to our first EOS (llama.cpp, told to ignore
EOS, bans it, so the sequences part there). Timings taken on a machine shared with other jobs are not comparable.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import urllib.request
from pathlib import Path

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common import interleaved, machine_line  # noqa: E402
from support.loading.gguf_export import write_gguf  # noqa: E402
from support.loading.sources import open_model  # noqa: E402

PROMPT = "房间很干净,服务也很周到,下次还会再来。\n这条评论的情感是正面还是负面?"


def llama_cpp(path: Path, threads: int, n_ctx: int):
    """llama.cpp's server on path (in this process) and a function that decodes ids greedily through it."""
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = str(path)
    params.n_ctx, params.n_parallel, params.warmup = n_ctx, 1, False
    params.cpuparams.n_threads = params.cpuparams_batch.n_threads = threads
    server = xllamacpp.Server(params)

    def decode(ids: list[int], n: int) -> list[int]:
        body = {"prompt": ids, "n_predict": n, "temperature": 0, "ignore_eos": True, "cache_prompt": False,
                "return_tokens": True}
        req = urllib.request.Request(server.listening_address + "/completion", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read())["tokens"]

    return server, decode


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="out/sft", help="any model source (ckpt.pt, run dir, HF dir, adapter dir)")
    p.add_argument("--outtypes", default="f32,q8_0", help="comma-separated GGUF types to time")
    p.add_argument("--threads", type=int, default=2, help="torch threads and llama.cpp threads")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="also time ours with compile_decode()")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer, origin = open_model(args.model)
    model = model.float()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                        tokenize=True, return_dict=False)
    n_ctx = len(ids) + args.new_tokens
    if n_ctx > model.config.max_seq_len:
        sys.exit(f"error: prompt {len(ids)} + --new-tokens {args.new_tokens} exceed the model's window "
                 f"{model.config.max_seq_len}")
    x = torch.tensor([ids])
    fns = {"ours eager": lambda: model.generate(x, args.new_tokens, temperature=0)}
    if args.compile:
        twin = open_model(args.model, own_tokenizer=False).model.float()
        twin.compile_decode()
        fns["ours compiled"] = lambda: twin.generate(x, args.new_tokens, temperature=0)
    servers = []  # kept alive while timed
    with tempfile.TemporaryDirectory() as tmp:
        for outtype in args.outtypes.split(","):
            path = Path(tmp) / f"model-{outtype}.gguf"
            write_gguf(model, tokenizer, path, outtype)
            server, decode = llama_cpp(path, args.threads, n_ctx)
            servers.append(server)
            fns[f"llama.cpp {outtype} ({path.stat().st_size / 2**20:.1f} MiB)"] = \
                lambda decode=decode: decode(ids, args.new_tokens)
        times = interleaved(fns, args.rounds, warmup=1, device="cpu")
        ours = model.generate(x, args.new_tokens, temperature=0)[0].tolist()
        ours = ours[:ours.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in ours else ours
        equal = {name: _leading_equal(torch.as_tensor(fn()).flatten().tolist(), ours) for name, fn in fns.items()}
    print(f"model: {origin['source']} ({model.num_params() / 1e6:.2f}M params), prompt {len(ids)} tokens, "
          f"{args.new_tokens} new tokens, greedy, {args.threads} threads, {args.rounds} rounds")
    print(f"machine: {machine_line('cpu')}")
    base = statistics.median(times["ours eager"])
    print("| variant | tokens/s | vs ours eager | tokens equal to ours |\n|---|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {args.new_tokens / statistics.median(t):,.1f} | {base / statistics.median(t):.2f}x | "
              f"{equal[name]} / {len(ours)} |")


def _leading_equal(tokens: list[int], ours: list[int]) -> int:
    """How many of ours come first in tokens, in order."""
    return next((i for i, (a, b) in enumerate(zip(tokens, ours)) if a != b), min(len(tokens), len(ours)))


if __name__ == "__main__":
    main()
