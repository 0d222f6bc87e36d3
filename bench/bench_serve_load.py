"""serve.py under a minute of mixed traffic: correct clients next to bad, slow and disconnecting ones.

  python bench/bench_serve_load.py                          # out/sft; 30 s clean, then 60 s mixed
  python bench/bench_serve_load.py --model out/sft --seconds 60 --clients 4

One serve.py process (with an API key) serves two phases. Clean: --clients correct clients, each sending
greedy requests of exactly --max_tokens tokens (`ignore_eos`) one after the other, streamed and not, to the
official AsyncOpenAI client. Mixed: the same correct clients, and beside them, as many of each hostile
kind, each looping with --pause seconds between its requests (a flood from one address is a firewall's
job, not the server's):
  bad         malformed JSON, an unknown role, a temperature of 1e-45, a body past --max_body_bytes
  keyless     a 13 MB body announced without the key (and never sent)
  slow        a stream read one chunk per 0.2 s
  disconnect  a request (streamed or not) whose client hangs up after 0.1 s
Printed: per phase the correct requests served, wrong answers (a greedy answer must be the same every time)
and unexpected errors, latency p50 / p95 (p95 against the clean run's), then each hostile kind's answers by
status, and the server's memory (RSS) sampled every second: at the start, the peak and the end of each phase.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys
import time
import urllib.request
from pathlib import Path

from openai import AsyncOpenAI

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import PROMPTS, percentile, start_server, wait_healthy  # noqa: E402
from common import machine_line  # noqa: E402
from support.loading.sources import resolve_device  # noqa: E402

KEY = "bench-key"


class Tally:
    """What the correct clients got, and each hostile kind's answers by status."""

    def __init__(self):
        self.latencies: list[float] = []
        self.wrong = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.hostile: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)


async def correct_client(client: AsyncOpenAI, model: str, i: int, args, answers: dict, tally: Tally,
                         until: float) -> None:
    """Greedy requests one after the other; each answer must equal the first one seen for its prompt."""
    n = 0
    while time.monotonic() < until:
        prompt, stream, n = PROMPTS[(i + n) % len(PROMPTS)], (i + n) % 2 == 0, n + 1
        start = time.perf_counter()
        try:
            kw = dict(model=model, messages=[{"role": "user", "content": prompt}], max_tokens=args.max_tokens,
                      temperature=0, extra_body={"ignore_eos": True})
            if stream:
                text = "".join([c.choices[0].delta.content or "" async for c in
                                await client.chat.completions.create(stream=True, **kw) if c.choices])
            else:
                text = (await client.chat.completions.create(**kw)).choices[0].message.content
        except Exception as e:  # noqa: BLE001 - counted: a correct client deserves no error
            tally.errors[type(e).__name__] += 1
            continue
        tally.latencies.append(time.perf_counter() - start)
        tally.wrong += answers.setdefault(prompt, text) != text


def chat_body(**fields) -> bytes:
    return json.dumps({"model": "?", "messages": [{"role": "user", "content": "你好"}], "max_tokens": 8,
                       **fields}).encode()


async def post(base: str, body: bytes, key: str | None = KEY, length: int | None = None,
               hang_up_after: float | None = None) -> str:
    """POSTs `body` to /v1/chat/completions over a plain socket (announcing `length` bytes if given) and
    returns the answer's status, or hangs up after `hang_up_after` seconds without reading it."""
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{auth}"
            f"Content-Length: {len(body) if length is None else length}\r\nConnection: close\r\n\r\n")
    try:
        writer.write(head.encode() + body)
        if hang_up_after is not None:
            await asyncio.sleep(hang_up_after)
            return "hung up"
        line = await asyncio.wait_for(reader.readline(), 30)
        return line.split()[1].decode() if line else "closed without an answer"
    except (OSError, TimeoutError) as e:  # a refused body may be cut off while it is being sent
        return type(e).__name__
    finally:
        writer.close()


async def bad_client(base: str, model: str, args, tally: Tally, until: float) -> None:
    bodies = {"malformed JSON": b'{"model": "x", "messages": [',
              "unknown role": chat_body(model=model, messages=[{"role": "bot", "content": "hi"}]),
              "temperature 1e-45": chat_body(model=model, temperature=1e-45),
              "body past the limit": chat_body(model=model, pad="a" * (args.max_body_bytes + 1))}
    n = 0
    while time.monotonic() < until:
        kind, body = list(bodies.items())[n % len(bodies)]
        n += 1
        tally.hostile[f"bad: {kind}"][await post(base, body)] += 1
        await asyncio.sleep(args.pause)


async def keyless_client(base: str, pause: float, tally: Tally, until: float) -> None:
    while time.monotonic() < until:
        tally.hostile["keyless: 13 MB announced, 1 byte sent"][await post(base, b"{", None, 13_000_000)] += 1
        await asyncio.sleep(pause)


async def slow_client(client: AsyncOpenAI, model: str, args, tally: Tally, until: float) -> None:
    while time.monotonic() < until:
        stream = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": "你好"}],
                                                      max_tokens=args.max_tokens, temperature=0, stream=True)
        async for _ in stream:
            await asyncio.sleep(0.2)
        tally.hostile["slow: a chunk per 0.2 s"]["200"] += 1


async def disconnecting_client(base: str, model: str, args, tally: Tally, until: float) -> None:
    n = 0
    while time.monotonic() < until:
        body = chat_body(model=model, max_tokens=4 * args.max_tokens, ignore_eos=True, stream=n % 2 == 0)
        n += 1
        tally.hostile["disconnect: hangs up after 0.1 s"][await post(base, body, hang_up_after=0.1)] += 1
        await asyncio.sleep(args.pause)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


async def sample_memory(pid: int, until: float, samples: list[float]) -> None:
    while time.monotonic() < until:
        samples.append(rss_mb(pid))
        await asyncio.sleep(1)


async def phase(base: str, model: str, pid: int, args, seconds: float, answers: dict,
                hostile: bool) -> tuple[Tally, list[float]]:
    tally, memory = Tally(), []
    until = time.monotonic() + seconds
    client = AsyncOpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=120)
    tasks = [correct_client(client, model, i, args, answers, tally, until) for i in range(args.clients)]
    tasks.append(sample_memory(pid, until, memory))
    if hostile:
        for _ in range(args.clients):
            tasks += [bad_client(base, model, args, tally, until), keyless_client(base, args.pause, tally, until),
                      slow_client(client, model, args, tally, until),
                      disconnecting_client(base, model, args, tally, until)]
    await asyncio.gather(*tasks)
    return tally, memory


def report(name: str, tally: Tally, memory: list[float], clean_p95: float | None) -> float:
    lat = tally.latencies
    p95 = percentile(lat, 95)
    versus = f" ({p95 / clean_p95:.2f}x clean)" if clean_p95 else ""
    print(f"| {name} | {len(lat)} | {tally.wrong} | {sum(tally.errors.values())} {dict(tally.errors) or ''} | "
          f"{percentile(lat, 50):.3f} | {p95:.3f}{versus} | {memory[0]:.0f} / {max(memory):.0f} / {memory[-1]:.0f} |")
    return p95


async def run(args, base: str, model: str, pid: int) -> None:
    answers: dict[str, str] = {}
    clean, clean_memory = await phase(base, model, pid, args, args.clean_seconds, answers, hostile=False)
    mixed, mixed_memory = await phase(base, model, pid, args, args.seconds, answers, hostile=True)
    print("| phase | correct requests served | wrong answers | errors | latency p50 (s) | latency p95 (s) | "
          "server RSS start / peak / end (MB) |")
    print("|---|---:|---:|---|---:|---:|---|")
    clean_p95 = report(f"clean, {args.clean_seconds:.0f} s", clean, clean_memory, None)
    report(f"mixed, {args.seconds:.0f} s", mixed, mixed_memory, clean_p95)
    print("server RSS every 10 s (MB): " + " ".join(f"{mb:.0f}" for mb in (clean_memory + mixed_memory)[::10]))
    print("| hostile client | answers |\n|---|---|")
    for kind, statuses in sorted(mixed.hostile.items()):
        print(f"| {kind} | {', '.join(f'{status}: {n}' for status, n in sorted(statuses.items()))} |")
    with urllib.request.urlopen(f"{base}/health", timeout=10) as r:
        print(f"server: {json.loads(r.read())}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="out/sft", help="what serve.py --model opens")
    p.add_argument("--tokenizer_path", default=None)
    p.add_argument("--clients", type=int, default=4, help="correct clients, and hostile clients of each kind")
    p.add_argument("--max_tokens", type=int, default=32, help="tokens of each correct request")
    p.add_argument("--seconds", type=float, default=60, help="the mixed phase")
    p.add_argument("--clean_seconds", type=float, default=30, help="the clean phase before it")
    p.add_argument("--pause", type=float, default=0.1, help="seconds between a hostile client's requests")
    p.add_argument("--max_batch", type=int, default=16)
    p.add_argument("--max_body_bytes", type=int, default=100_000, help="serve.py's limit, which bad clients pass")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--no_compile", action="store_true", help="the server decodes eagerly (serve.py --no_compile)")
    args = p.parse_args()

    proc, base = start_server(args, args.max_batch, "--api_key", KEY, "--max_body_bytes", str(args.max_body_bytes))
    try:
        health = wait_healthy(proc, base, timeout=900)  # compiling takes minutes on a busy machine
        print(f"machine: {machine_line(resolve_device(args.device).type)}")
        print(f"model: {args.model}; {args.clients} correct clients, {args.max_tokens} tokens per request, greedy; "
              f"--max_batch {args.max_batch}")
        asyncio.run(run(args, base, health["model"], proc.pid))
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
