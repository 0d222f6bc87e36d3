"""serve.py under concurrent streaming clients: continuous batching against a queue (one request at a time).

  python bench/bench_serve.py                                    # out/sft; 1, 4 and 16 clients
  python bench/bench_serve.py --model out/sft --clients 1 4 16 --max_tokens 64 --rounds 5

Two servers (serve.py processes) load the same model: `--max_batch 1`, a queue that decodes requests one at
a time in arrival order, and `--max_batch` = the most clients, where requests join the running batch. For
each number of clients, rounds alternate queue / batched (A B A B ...): that many official AsyncOpenAI
clients each stream one greedy reply of exactly --max_tokens tokens (`ignore_eos`) to its own prompt.
Printed: tokens/s (every client's tokens over the round's wall time; median of the rounds), latency from
sending a request to its last token (p50 / p95 over every request of every round) and time to first token.
Both servers must give each client the same greedy answer; the script says so if they do not.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from openai import AsyncOpenAI

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from common import machine_line  # noqa: E402
from support.loading.sources import resolve_device  # noqa: E402

PROMPTS = [
    "你好",
    "房间很干净,服务也很周到,下次还会再来。\n这条评论的情感是正面还是负面?",
    "质量太差了,用了两天就坏了,不推荐。\n这条评论的情感是正面还是负面?",
    "今天天气怎么样?",
    "What is your name?",
    "介绍一下北京。",
    "Do you like music?",
    "谢谢你的帮助!",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, max_batch: int, *extra: str) -> tuple[subprocess.Popen, str]:
    """serve.py on a free port of 127.0.0.1 with the bench's flags and `extra` ones; returns it and its URL."""
    port = free_port()
    cmd = [sys.executable, str(ROOT / "serve.py"), "--model", args.model, "--port", str(port), "--max_batch",
           str(max_batch), "--device", args.device, "--dtype", args.dtype, "--log_level", "warning", *extra]
    if args.tokenizer_path:
        cmd += ["--tokenizer_path", args.tokenizer_path]
    if args.no_compile:
        cmd.append("--no_compile")
    return subprocess.Popen(cmd, cwd=ROOT), f"http://127.0.0.1:{port}"


def wait_healthy(proc: subprocess.Popen, base: str, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"error: serve.py exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=5) as r:
                return json.loads(r.read())
        except OSError:
            time.sleep(0.2)
    sys.exit(f"error: {base} did not answer /health within {timeout:.0f} s")


async def one_request(client: AsyncOpenAI, model: str, prompt: str, max_tokens: int) -> dict:
    start = time.perf_counter()
    first, text, tokens = None, "", 0
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            text += chunk.choices[0].delta.content
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    return {"latency": end - start, "first_token": (first or end) - start, "tokens": tokens, "text": text}


async def one_round(client: AsyncOpenAI, model: str, clients: int, max_tokens: int) -> tuple[float, list[dict]]:
    """Every client sends at once; returns (the round's wall seconds, each client's result)."""
    start = time.perf_counter()
    results = await asyncio.gather(*(one_request(client, model, PROMPTS[i % len(PROMPTS)], max_tokens)
                                     for i in range(clients)))
    return time.perf_counter() - start, results


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


async def run(args: argparse.Namespace, servers: dict[str, str], model: str) -> None:
    clients = {name: AsyncOpenAI(base_url=f"{base}/v1", api_key="-", max_retries=0, timeout=600)
               for name, base in servers.items()}
    for client in clients.values():  # warm-up: first-call allocations and lazy imports
        await one_round(client, model, 1, args.max_tokens)
    print("| clients | server | tokens/s | latency p50 (s) | latency p95 (s) | first token p50 (s) |")
    print("|---:|---|---:|---:|---:|---:|")
    ratios = []
    for n in args.clients:
        rates: dict[str, list[float]] = {name: [] for name in servers}
        requests: dict[str, list[dict]] = {name: [] for name in servers}
        for _ in range(args.rounds):
            for name, client in clients.items():  # A B A B ...: drifting machine load hits both alike
                wall, results = await one_round(client, model, n, args.max_tokens)
                rates[name].append(sum(r["tokens"] for r in results) / wall)
                requests[name] += results
        for name in servers:
            lat = [r["latency"] for r in requests[name]]
            ttft = [r["first_token"] for r in requests[name]]
            print(f"| {n} | {name} | {statistics.median(rates[name]):,.0f} | {percentile(lat, 50):.3f} | "
                  f"{percentile(lat, 95):.3f} | {percentile(ttft, 50):.3f} |", flush=True)
        texts = {name: [r["text"] for r in requests[name]] for name in servers}
        if texts["queue"] != texts["batched"]:
            print(f"warning: answers differ between the servers at {n} clients")
        ratios.append(f"{n} client(s) {statistics.median(rates['batched']) / statistics.median(rates['queue']):.2f}x")
    print("batched / queue tokens/s: " + ", ".join(ratios))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="out/sft", help="what serve.py --model opens")
    p.add_argument("--tokenizer_path", default=None)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="concurrent clients per row")
    p.add_argument("--max_tokens", type=int, default=64, help="tokens each client streams")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--no_compile", action="store_true", help="the servers decode eagerly (serve.py --no_compile)")
    args = p.parse_args()

    procs = {}
    try:
        for name, max_batch in (("queue", 1), ("batched", max(args.clients))):
            procs[name] = start_server(args, max_batch)
        servers = {name: base for name, (_, base) in procs.items()}
        health = [wait_healthy(proc, base) for proc, base in procs.values()][0]
        print(f"machine: {machine_line(resolve_device(args.device).type)}")
        print(f"model: {args.model}; {args.max_tokens} tokens per client, {args.rounds} round(s), greedy")
        asyncio.run(run(args, servers, health["model"]))
    finally:
        for proc, _ in procs.values():
            proc.terminate()
        for proc, _ in procs.values():
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
