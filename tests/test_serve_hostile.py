"""serve.py against bad, slow, disconnecting and hostile clients: each one costs only its own request, the
neighbours that share its batch get their answers (compared with model_sample's, alone), and the server
keeps serving. Traffic goes to 127.0.0.1 only; every request and wait is bounded.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch

from support.inference.text_generator import TextGenerator
from serve import Limits, create_app
from test_serve import CONTEXT, MODEL, ask, chat, client_for, http, live, model_dir, reference  # noqa: F401
from train_helpers import ROOT, run_script


@pytest.fixture(scope="module")
def gen(model_dir) -> TextGenerator:  # noqa: F811 - this module's own generator, so monkeypatching stays here
    return TextGenerator(model_dir, device="cpu", dtype="float32")


def wait_for(base: str, **wanted: int) -> dict:
    """Polls /health until its counters have the wanted values (10 s at most)."""
    for _ in range(400):
        health = http(f"{base}/health")[1]
        if all(health.get(k) == v for k, v in wanted.items()):
            return health
        time.sleep(0.025)
    raise AssertionError(f"/health never reached {wanted}: {health}")


def raw_request(base: str, head: str, body: bytes = b"", timeout: float = 10) -> tuple[int, dict, dict]:
    """Sends `head` (request line and headers, without the blank line) and `body` over a socket, then reads
    the answer: (status, headers, JSON body). A server that waits for bytes never sent times the read out."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(head.encode() + b"\r\nConnection: close\r\n\r\n" + body)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    head_text, _, payload = answer.partition(b"\r\n\r\n")
    lines = head_text.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(payload)


def post_head(path: str, length: int, key: str | None = None) -> str:
    auth = f"\r\nAuthorization: Bearer {key}" if key else ""
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}{auth}")


def greedy_ignoring_eos(gen: TextGenerator, prompt: str, tokens: int) -> str:
    """model_sample's greedy reply of exactly `tokens` tokens, alone."""
    ids = torch.tensor([gen.chat_ids(chat(prompt))])
    return gen.decode(gen.model.generate(ids, tokens, temperature=0.0)[0].tolist())


def long_stream(client: openai.OpenAI, tokens: int = CONTEXT // 2):
    """A greedy stream of exactly `tokens` tokens that has started (its first chunk has arrived)."""
    stream = client.chat.completions.create(model=MODEL, messages=chat("你好"), max_tokens=tokens, stream=True,
                                            temperature=0, extra_body={"ignore_eos": True})
    chunks = iter(stream)
    next(chunks)
    return stream, chunks


# ----------------------------------------------------------------------------------------------------------
# item 1: a temperature that cannot be sampled from


def test_vanishing_temperature_is_greedy_and_spares_its_batch(gen):
    """1.8e-38 and 1e-45 overflow the logits they divide: they are answered greedily (as 0 is), and greedy,
    seeded and ordinary requests decoded in the same batch get their own answers."""
    jobs = [("你好", 40, dict(temperature=1.8e-38)), ("hello there", 40, dict(temperature=1e-45)),
            ("今天天气怎么样?", 40, dict(temperature=0)), ("中国", 30, dict(temperature=0.9, top_p=0.8, seed=3)),
            ("a", 40, dict(temperature=5e-324))]
    with live(create_app(gen, MODEL, max_batch=len(jobs))) as base:
        client = client_for(base)
        with ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(lambda j: ask(client, chat(j[0]), j[1], j[0] == "a", **j[2]), jobs))
        for (prompt, max_tokens, kw), (text, finish, usage) in zip(jobs, answers):
            sampled = dict(temperature=0.9, top_p=0.8, seed=3) if "seed" in kw else {}
            assert (text, usage.completion_tokens, finish) == reference(gen, chat(prompt), max_tokens, **sampled)


def test_a_row_whose_sampling_fails_ends_alone(gen, monkeypatch):
    """Whatever goes wrong while sampling one row's token in a running batch (here the marked request's third
    draw raises as torch does for NaN probabilities; it ignores EOS, so a sampled EOS cannot end it earlier),
    that row ends with a server error and the greedy row beside it is answered in full."""
    from support.inference import generation_engine

    real = generation_engine.sample
    draws = []

    def poisoned(logits, temperature, top_k, top_p):
        draws.append(top_k)
        if draws.count(7) == 3:  # the marked request, after its prefill and one decode step
            raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        return real(logits, temperature, top_k, top_p)

    monkeypatch.setattr(generation_engine, "sample", poisoned)
    with live(create_app(gen, MODEL, max_batch=2)) as base:
        client = client_for(base)
        stream, chunks = long_stream(client, 60)
        wait_for(base, running=1)
        with pytest.raises(openai.InternalServerError, match="probability tensor"):
            client.chat.completions.create(model=MODEL, messages=chat("中国"), max_tokens=5, temperature=1,
                                           extra_body={"top_k": 7, "ignore_eos": True})
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == greedy_ignoring_eos(gen, "你好", 60)
        assert wait_for(base, running=0)["finished"] == 1


# ----------------------------------------------------------------------------------------------------------
# item 2: whatever fails inside the engine ends the affected requests, never a silent hang


def test_out_of_memory_while_growing_the_batch_fails_only_the_joining_request(gen, monkeypatch):
    model = gen.model
    real = model.new_caches
    failures = []

    def no_memory_for_two_rows(batch, device, slots=None):
        if batch == 2 and not failures:
            failures.append(batch)
            raise torch.OutOfMemoryError("out of memory (while laying out 2 rows)")
        return real(batch, device, slots)

    monkeypatch.setattr(model, "new_caches", no_memory_for_two_rows)
    with live(create_app(gen, MODEL, max_batch=2)) as base:
        client = client_for(base)
        stream, chunks = long_stream(client, 80)
        wait_for(base, running=1)  # so that the next request joins a running batch
        with pytest.raises(openai.InternalServerError, match="out of memory"):
            client.chat.completions.create(model=MODEL, messages=chat("中国"), max_tokens=5, temperature=0)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == greedy_ignoring_eos(gen, "你好", 80) and failures == [2]
        # the engine still serves: a request after the failure gets its greedy answer
        assert ask(client, chat("中国"), 10, False, temperature=0)[0] == reference(gen, chat("中国"), 10)[0]


def test_an_engine_that_cannot_start_says_so(gen, monkeypatch):
    """Packing the weights fails as the engine starts: /health answers 503 with the reason, and requests get
    503 at once instead of waiting forever."""

    def no_memory():
        raise torch.OutOfMemoryError("out of memory while packing weights")

    monkeypatch.setattr(gen.model, "packed_weights", no_memory)
    with live(create_app(gen, MODEL)) as base:
        for _ in range(200):
            status, health = http(f"{base}/health")
            if status != 200:
                break
            time.sleep(0.025)
        assert status == 503 and "out of memory while packing weights" in health["error"]
        code, answer = http(f"{base}/v1/chat/completions", json.dumps({"model": MODEL, "messages": chat("你好")}))
        assert code == 503 and "out of memory" in answer["error"]["message"]


def test_serve_exits_non_zero_when_its_engine_fails(model_dir):  # noqa: F811
    """The same failure in serve.py itself: one error line and exit status 1, not a server that hangs on."""
    script = ("import sys, torch, serve, k_model\n"
              "def no_memory(self):\n"
              "    raise torch.OutOfMemoryError('out of memory while packing weights')\n"
              "k_model.Transformer.packed_weights = no_memory\n"
              "serve.main(sys.argv[1:])\n")
    proc = subprocess.run([sys.executable, "-c", script, "--model", model_dir, "--no_compile", "--port", "0",
                           "--log_level", "critical"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == ("error: the engine failed: OutOfMemoryError: out of memory "
                                                    "while packing weights")


# ----------------------------------------------------------------------------------------------------------
# item 3: a non-streaming client that hangs up frees its row


def send_long_request(base: str) -> socket.socket:
    """A connection that has sent a non-streaming request of a long reply, and reads nothing."""
    host, port = base.removeprefix("http://").split(":")
    body = json.dumps({"model": MODEL, "messages": chat("你好"), "max_tokens": CONTEXT - 20, "temperature": 0,
                       "ignore_eos": True}).encode()
    s = socket.create_connection((host, int(port)), timeout=10)
    s.sendall(post_head("/v1/chat/completions", len(body)).encode() + b"\r\n\r\n" + body)
    return s


def hang_up_while_running(base: str) -> None:
    """A non-streaming request of a long reply whose client hangs up once it is being decoded."""
    with send_long_request(base):
        wait_for(base, running=1)
    wait_for(base, running=0)


def test_non_streaming_client_that_disconnects_frees_its_row(gen):
    with live(create_app(gen, MODEL, max_batch=1)) as base:
        hang_up_while_running(base)
        text, _, _ = ask(client_for(base), chat("中国"), 10, False, temperature=0)
        assert text == reference(gen, chat("中国"), 10)[0]
        health = wait_for(base, cancelled=1)
        assert (health["finished"], health["running"]) == (1, 0)


# ----------------------------------------------------------------------------------------------------------
# item 4: trimming a long chat


def one_turn_at_a_time(gen: TextGenerator, messages: list[dict], max_new_tokens: int) -> list[dict]:
    """The trimming rule written out plainly: drop the oldest turn (a user turn with its answer) while the
    conversation is too long; the system prompt and the last message stay."""
    budget = gen.context_len - min(max_new_tokens, gen.context_len // 2)
    system = messages[:1] if messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    while len(turns) > 1 and len(gen.chat_ids(system + turns)) > budget:
        turns = turns[2:] if turns[0]["role"] == "user" and len(turns) > 2 else turns[1:]
    return system + turns


def long_chat(n: int) -> list[dict]:
    turns = [{"role": ("user", "assistant")[i % 2], "content": f"{i} 今天天气很好,我们去公园散步吧。" * (1 + i % 3)}
             for i in range(n)]
    return [{"role": "system", "content": "你是助手"}, *turns, {"role": "assistant", "content": "好"},
            {"role": "user", "content": "你好"}]


def test_trimming_keeps_the_same_turns_and_tokenizes_a_few_times(gen, monkeypatch):
    for n in (0, 1, 2, 7, 40, 161):
        messages = long_chat(n)
        for wanted in (20, CONTEXT):
            assert gen.trim_history(messages, wanted) == one_turn_at_a_time(gen, messages, wanted), (n, wanted)
    calls = []
    real = gen.chat_ids
    monkeypatch.setattr(gen, "chat_ids", lambda m: calls.append(len(m)) or real(m))
    kept = gen.trim_history(long_chat(1000), 20)
    tokenizations = len(calls)
    assert len(gen.chat_ids(kept)) <= CONTEXT - 20 < len(gen.chat_ids(kept[:1] + long_chat(1000)[-len(kept) - 1:]))
    assert tokenizations <= 12  # a binary search over ~500 possible cuts, not one tokenization per cut


# ----------------------------------------------------------------------------------------------------------
# item 5: the key before the body; limits on the body, the messages and the queue


def test_a_request_without_the_key_is_refused_before_its_body_is_read(gen):
    with live(create_app(gen, MODEL, api_key="sekrit")) as base:
        # 13 MB announced, none sent: an answer that waited for the body would time the read out
        status, _, answer = raw_request(base, post_head("/v1/chat/completions", 13_000_000))
        assert status == 401 and answer["error"]["code"] == "invalid_api_key"


def test_a_body_above_the_limit_is_refused(gen):
    with live(create_app(gen, MODEL, api_key="sekrit", limits=Limits(max_body_bytes=100_000))) as base:
        # announced: refused before reading
        status, _, answer = raw_request(base, post_head("/v1/chat/completions", 13_000_000, "sekrit"))
        assert status == 413 and "100000 bytes" in answer["error"]["message"]
        # sent in chunks with no length announced: refused once past the limit (just past it, so that the
        # server has read every byte sent when it answers, and its closing the connection resets nothing)
        body = json.dumps({"model": MODEL, "messages": chat("")}).encode()
        body = body.replace(b'"content": ""', b'"content": "%s"' % (b"a" * (100_010 - len(body))))
        chunked = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 8192]), body[i:i + 8192])
                           for i in range(0, len(body), 8192)) + b"0\r\n\r\n"
        head = ("POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                "Transfer-Encoding: chunked\r\nAuthorization: Bearer sekrit")
        status, _, answer = raw_request(base, head, chunked)
        assert status == 413
        assert ask(client_for(base, "sekrit"), chat("中国"), 5, False, temperature=0)[0] == \
            reference(gen, chat("中国"), 5)[0]


def test_too_many_messages_are_refused(gen):
    with live(create_app(gen, MODEL, limits=Limits(max_messages=50))) as base:
        body = json.dumps({"model": MODEL, "messages": long_chat(60)})
        code, answer = http(f"{base}/v1/chat/completions", body)
        assert code == 400 and answer["error"]["param"] == "messages" and "50" in answer["error"]["message"]


def test_a_full_queue_answers_429_with_retry_after(gen):
    with live(create_app(gen, MODEL, max_batch=1, limits=Limits(max_waiting=1))) as base:
        client = client_for(base)
        stream, _ = long_stream(client)
        with ThreadPoolExecutor(1) as pool:
            queued = pool.submit(ask, client, chat("中国"), 5, False, temperature=0)
            wait_for(base, running=1, waiting=1)
            body = json.dumps({"model": MODEL, "messages": chat("你好"), "max_tokens": 3}).encode()
            status, headers, answer = raw_request(base, post_head("/v1/chat/completions", len(body)), body)
            assert status == 429 and int(headers["retry-after"]) >= 1
            assert answer["error"]["type"] == "rate_limit_error"
            stream.close()
            assert queued.result(timeout=30)[0] == reference(gen, chat("中国"), 5)[0]


# ----------------------------------------------------------------------------------------------------------
# item 6: the compiled step never compiles in the middle of serving


def test_compiled_step_refuses_a_batch_it_was_not_traced_for(model_dir, capfd):  # noqa: F811
    """Warmed up for --max_batch 1, the compiled step has one graph; a batch of 2 is refused with an error
    naming the traced sizes instead of compiling a new graph while clients wait."""
    fast = TextGenerator(model_dir, device="cpu", dtype="float32")
    fast.compile_decode(max_batch=1)
    assert capfd.readouterr().err.count("fast decode: compiled the one-token step") == 1
    with pytest.raises(RuntimeError, match="traced for batches up to 1"):
        fast.model.generate(torch.tensor([[fast.eos_id]] * 2), 2, temperature=0.0)


# ----------------------------------------------------------------------------------------------------------
# item 7: shutdown


def test_sigterm_ends_running_and_queued_requests_then_exits(model_dir, tmp_path):  # noqa: F811
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--model", model_dir, "--model_name", MODEL,
                               "--port", str(port),
                               "--max_batch", "1", "--no_compile", "--dtype", "float32", "--device", "cpu",
                               "--log_level", "warning"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if http(f"{base}/health")[0] == 200:
                    break
            except OSError:
                time.sleep(0.1)
        hang_up_while_running(base)  # its handler must be done too, or the server would wait for it forever
        client = client_for(base)
        stream, chunks = long_stream(client, CONTEXT - 20)
        with ThreadPoolExecutor(1) as pool:
            queued = pool.submit(lambda: http(f"{base}/v1/chat/completions", json.dumps(
                {"model": MODEL, "messages": chat("中国"), "max_tokens": 5})))
            wait_for(base, waiting=1)
            server.send_signal(signal.SIGTERM)
            with pytest.raises(openai.APIError, match="shutting down"):
                for _ in chunks:
                    pass
            code, answer = queued.result(timeout=30)
        assert code == 503 and "shutting down" in answer["error"]["message"]
        server.wait(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
        output = server.communicate()[0]
    assert "Traceback" not in output, output


# ----------------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------------
# issue 31, item 6: places in the queue, chat templates that refuse, the tokenizing thread's queue


def test_clients_that_hang_up_while_queued_give_their_places_back(gen):
    """--max_batch 1 --max_waiting 2: two queued clients time out and hang up; the next client is queued (not
    refused with 429 while nobody waits) and answered once the row frees."""
    with live(create_app(gen, MODEL, max_batch=1, limits=Limits(max_waiting=2))) as base:
        client = client_for(base)
        stream, _ = long_stream(client, 4000)  # seconds of decoding: it holds the row until closed
        queued = [send_long_request(base) for _ in range(2)]
        wait_for(base, running=1, waiting=2)
        for s in queued:
            s.close()
        wait_for(base, waiting=0)
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(ask, client, chat("中国"), 5, False, temperature=0)
            wait_for(base, waiting=1)
            stream.close()
            assert answer.result(timeout=30)[0] == reference(gen, chat("中国"), 5)[0]
        assert wait_for(base, running=0)["cancelled"] == 3


def with_template(model_dir: str, path, template: str) -> TextGenerator:  # noqa: F811
    """The model of model_dir, its chat template replaced by `template` ({original}: the template it had)."""
    path = shutil.copytree(model_dir, path)
    file = path / "chat_template.jinja"
    file.write_text(template.replace("{original}", file.read_text(encoding="utf-8")), encoding="utf-8")
    return TextGenerator(str(path), device="cpu", dtype="float32")


def test_a_chat_template_that_refuses_the_messages_is_a_400(model_dir, tmp_path):  # noqa: F811
    """A Llama 2 / Mistral style template raises for a system prompt: an OpenAI-shaped 400 with its message
    (a 500 would have the openai client retry it in vain); without a system prompt the server answers. A
    template the server cannot use for a conversation (it does not close an assistant reply with EOS) is a
    server error, still in OpenAI's shape with the reason."""
    refusing = with_template(model_dir, tmp_path / "refusing", "{% if messages[0]['role'] == 'system' %}"
                             "{{ raise_exception('System role not supported') }}{% endif %}{original}")
    with live(create_app(refusing, MODEL)) as base:
        client = client_for(base)
        with pytest.raises(openai.BadRequestError, match="System role not supported") as refused:
            client.chat.completions.create(model=MODEL, max_tokens=3, messages=[{"role": "system", "content": "x"},
                                                                                *chat("你好")])
        assert refused.value.body["param"] == "messages"
        assert ask(client, chat("你好"), 3, False, temperature=0)[0] == reference(refusing, chat("你好"), 3)[0]
    unclosed = with_template(model_dir, tmp_path / "unclosed", "{% for m in messages %}{{ '<|im_start|>' + m['role'] "
                             "+ '\\n' + m['content'] + '\\n' }}{% endfor %}{{ '<|im_start|>assistant\\n' }}")
    with live(create_app(unclosed, MODEL)) as base:
        with pytest.raises(openai.InternalServerError, match="does not close an assistant reply with EOS"):
            client_for(base).chat.completions.create(model=MODEL, max_tokens=3, messages=[
                *chat("你好"), {"role": "assistant", "content": "你好"}, *chat("再见")])


def test_requests_waiting_to_be_tokenized_count_toward_max_waiting(gen):
    """Conversations of ~0.5 MB take the tokenizing thread seconds each: with --max_waiting 1, while one is
    tokenized and one waits for the thread, a small request gets 429 at once instead of waiting behind them."""
    turn = "今天天气很好,我们去公园散步吧。" * 30
    messages = [{"role": ("user", "assistant")[i % 2], "content": f"{i} {turn}"} for i in range(399)]
    huge = json.dumps({"model": MODEL, "messages": messages, "max_tokens": 1}, ensure_ascii=False).encode()
    small = json.dumps({"model": MODEL, "messages": chat("你好"), "max_tokens": 1}).encode()
    with live(create_app(gen, MODEL, limits=Limits(max_waiting=1))) as base:
        with ThreadPoolExecutor(2) as pool:
            big = [pool.submit(raw_request, base, post_head("/v1/chat/completions", len(huge)), huge, 60)
                   for _ in range(2)]
            wait_for(base, tokenizing=2)
            status, headers, answer = raw_request(base, post_head("/v1/chat/completions", len(small)), small)
            assert status == 429 and answer["error"]["type"] == "rate_limit_error" and int(headers["retry-after"]) >= 1
            assert [b.result()[0] for b in big] == [200, 200]


# ----------------------------------------------------------------------------------------------------------


def test_bench_serve_load_reports_served_requests_and_deserved_errors_only(model_dir):  # noqa: F811
    proc = run_script("bench/bench_serve_load.py", ["--model", model_dir, "--clients", "2", "--seconds", "4",
                                                    "--clean_seconds", "2", "--max_tokens", "6", "--dtype", "float32",
                                                    "--no_compile"], timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    phases = re.findall(r"^\| (clean|mixed), [\d.]+ s \| (\d+) \| (\d+) \| (\d+) ", proc.stdout, re.M)
    assert [p[0] for p in phases] == ["clean", "mixed"], proc.stdout
    assert all(int(served) > 0 and (wrong, errors) == ("0", "0") for _, served, wrong, errors in phases), proc.stdout
    deserved = {"bad: malformed JSON": "400", "bad: unknown role": "400", "bad: temperature 1e-45": "200",
                "bad: body past the limit": "413", "keyless: 13 MB announced, 1 byte sent": "401"}
    for kind, status in deserved.items():
        answers = re.search(rf"^\| {re.escape(kind)} \| (.*) \|$", proc.stdout, re.M).group(1)
        # a refused body may also be cut off while the client still sends it (the server closed the socket)
        assert re.fullmatch(rf"(ConnectionResetError: \d+, )?{status}: \d+", answers), (kind, answers)
    assert "'failed': 0" in proc.stdout and "'state': 'serving'" in proc.stdout
