"""Serve a trained model over an OpenAI-compatible HTTP API, with a web chat page.

    python serve.py                                  # out/sft on http://127.0.0.1:8000 (the chat page is at /)
    python serve.py --model out/pretrain --port 8001 # a pretrained model: use /v1/completions
    python serve.py --api_key secret                 # /v1/* then need "Authorization: Bearer secret"
    python serve.py --max_batch 1                    # one request at a time, the others wait in a queue
    python serve.py --no_compile                     # start at once and decode eagerly

Endpoints: GET / (chat page), GET /health, GET /v1/models, POST /v1/chat/completions, POST /v1/completions.
The official `openai` client works unchanged: OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-").

The model is loaded by model_sample.TextGenerator (any ckpt.pt, run dir or HF export, its tokenizer) and
decoded by one engine thread. Requests that arrive while others are generating join the running batch at
the next token (continuous batching, up to --max_batch rows): each is prefilled alone, then its KV cache is
laid next to the others', and every step decodes one token for every row. A row leaves as soon as it
finishes or its client goes away, so a slow client never holds a fast one back. The step is compiled before
the server starts (k_model.compile_decode; one graph for batch 1, one for larger batches) and reads packed
copies of the weights (Transformer.packed_weights).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import os
import queue
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from k_model import KVCache, Transformer
from loading import DTYPES
from model_sample import TextGenerator
from sampling import sample

CHAT_PAGE = Path(__file__).resolve().parent / "static" / "chat.html"
log = logging.getLogger("serve")


# ----------------------------------------------------------------------------------------------------------
# A request as the engine sees it


@dataclass
class Sampling:
    max_tokens: int  # already capped so that prompt + reply fit the context window
    temperature: float  # 0 = greedy
    top_p: float | None = None
    top_k: int | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False  # generate exactly max_tokens (benchmarks)


@dataclass
class Event:
    """What the engine tells a request: more text, and on the last event why it ended and how many tokens
    were generated (the end-of-sequence token included)."""
    text: str
    finish_reason: str | None = None  # "stop" | "length" | "error"
    completion_tokens: int = 0
    error: str | None = None


class Job:
    """A request between the HTTP handler (on the event loop) and the engine thread, which sends it events
    with call_soon_threadsafe. `cancelled` is set by the handler when its client goes away."""

    def __init__(self, prompt: list[int], sampling: Sampling):
        self.prompt = prompt
        self.sampling = sampling
        self.cancelled = False
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue[Event] = asyncio.Queue()

    def emit(self, event: Event) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is closed: the server is shutting down
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)

    async def events(self) -> AsyncIterator[Event]:
        while True:
            event = await self._events.get()
            yield event
            if event.finish_reason:
                return


class TextStream:
    """A row's tokens -> text deltas. Like TextGenerator's streaming it holds back an incomplete character
    (a Chinese character spans several byte-level tokens); it also holds back a tail that may be the start
    of a stop string, so a stop string never reaches the client, even split across tokens."""

    def __init__(self, decode: Callable[[list[int]], str], stop: list[str]):
        self.decode = decode
        self.stop = stop
        self.tokens: list[int] = []
        self.text = ""
        self.sent = 0  # characters of self.text already handed out

    def push(self, token: int) -> tuple[str, bool]:
        """Adds a token; returns (new text that is safe to send, whether a stop string was reached)."""
        self.tokens.append(token)
        self.text = self.decode(self.tokens)
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stop) if i >= 0]
        if hits:
            return self._release(min(hits)), True
        if self.text.endswith("\ufffd"):
            return "", False
        return self._release(len(self.text) - self._stop_prefix_len()), False

    def flush(self) -> str:
        """Whatever is held back, once no token will follow."""
        return self._release(len(self.text))

    def _stop_prefix_len(self) -> int:
        tail = self.text[self.sent :]
        return max((k for s in self.stop for k in range(1, min(len(s), len(tail) + 1)) if tail.endswith(s[:k])),
                   default=0)

    def _release(self, end: int) -> str:
        piece, self.sent = self.text[self.sent : end], end
        return piece


# ----------------------------------------------------------------------------------------------------------
# Batched decoding


class DecodeBatch:
    """The KV caches of the rows being decoded, laid side by side. Rows are right-aligned, so every row's
    newest token sits in the same cache slot and one forward step serves them all; a shorter row's first
    slots are padding, masked out. The layout is rebuilt only when rows join or leave."""

    def __init__(self, model: Transformer):
        self.model = model
        self.caches: list[KVCache] = []
        self.lengths: list[int] = []  # tokens cached per row
        self.key_mask: torch.Tensor | None = None  # (B, max_seq_len): the cache slots each row attends to

    @property
    def width(self) -> int:
        return max(self.lengths, default=0)

    def prefill(self, prompt: list[int]) -> tuple[torch.Tensor, list[KVCache]]:
        """One prompt alone (as model.generate runs it): its next-token logits (V,) and its caches."""
        tokens = torch.tensor([prompt], device=self.model.device)
        caches = self.model.new_caches(1, tokens.device)
        logits, _, _ = self.model.prefill(tokens, torch.ones_like(tokens, dtype=torch.bool), caches)
        return logits[0], caches

    def regroup(self, keep: list[int], joining: list[tuple[list[KVCache], int]]) -> None:
        """The new batch: the kept rows (indices into the current one, in order), then the joining rows
        (the caches of each one's prefill, and its prompt length)."""
        # (caches, row, tokens, slot after its last token) of each row of the new batch
        sources = [(self.caches, i, self.lengths[i], self.width) for i in keep]
        sources += [(caches, 0, n, n) for caches, n in joining]
        self.lengths = [n for _, _, n, _ in sources]
        width, device = self.width, self.model.device
        self.caches = self.model.new_caches(len(sources), device) if sources else []
        for layer, cache in enumerate(self.caches):
            for b, (src, i, n, end) in enumerate(sources):
                cache.k[b, :, width - n : width] = src[layer].k[i, :, end - n : end]
                cache.v[b, :, width - n : width] = src[layer].v[i, :, end - n : end]
        slots = torch.arange(self.model.config.max_seq_len, device=device)
        first = torch.tensor([width - n for n in self.lengths], device=device)
        self.key_mask = (slots >= first[:, None]) & (slots < width)

    def step(self, tokens: list[int]) -> torch.Tensor:
        """Feeds each row its newest token into slot `width`; returns every row's next-token logits (B, V)."""
        device, width = self.model.device, self.width
        self.key_mask[:, width] = True
        logits = self.model.decode_step(torch.tensor(tokens, device=device),
                                  torch.tensor(self.lengths, device=device),  # a row's next position = its length
                                  torch.tensor([width], device=device), self.key_mask[:, : width + 1], self.caches)
        self.lengths = [n + 1 for n in self.lengths]
        return logits


@dataclass
class Row:
    """A job being decoded: its text so far, its random stream, and the token to feed at the next step."""
    job: Job
    text: TextStream
    rng_state: torch.Tensor
    generated: int = 0
    next_token: int = -1


class Engine:
    """Owns the model and runs it in one thread: admits waiting jobs (up to max_batch rows), decodes a token
    for every row per step, sends each job its text, drops finished and cancelled rows."""

    def __init__(self, gen: TextGenerator, max_batch: int = 16):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.gen = gen
        self.max_batch = max_batch
        self.batch = DecodeBatch(gen.model)
        self.rows: list[Row] = []
        self.waiting: queue.Queue[Job | None] = queue.Queue()  # None asks the thread to stop
        self.counts = {"finished": 0, "cancelled": 0}
        # k_model.sample draws from torch's default generator of the model's device
        if gen.device.type == "cuda":
            self._get_rng = lambda: torch.cuda.get_rng_state(gen.device)
            self._set_rng = lambda state: torch.cuda.set_rng_state(state, gen.device)
        else:
            self._get_rng, self._set_rng = torch.get_rng_state, torch.set_rng_state
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.waiting.put(None)
        self._thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        self.waiting.put(job)

    def stats(self) -> dict[str, int]:
        return {"running": len(self.rows), "waiting": self.waiting.qsize(), "max_batch": self.max_batch,
                **self.counts}

    def _run(self) -> None:
        # the weights never change while serving: their packed copies for decode steps are made once
        with torch.inference_mode(), self.gen.model.packed_weights():
            while self._admit():
                if not self.rows:
                    continue
                try:
                    self._step()
                except Exception as e:  # noqa: BLE001 - a failed step must not leave its clients waiting forever
                    log.exception("decode step failed")
                    for row in self.rows:
                        row.job.emit(Event("", "error", row.generated, error=f"{type(e).__name__}: {e}"))
                    self.rows = []
                    self.batch.regroup([], [])

    def _admit(self) -> bool:
        """Moves waiting jobs into the batch while there is room; blocks while there is nothing to decode.
        Returns False once asked to stop."""
        joining: list[tuple[Row, list[KVCache]]] = []
        while len(self.rows) + len(joining) < self.max_batch:
            try:
                job = self.waiting.get(block=not (self.rows or joining))
            except queue.Empty:
                break
            if job is None:
                return False
            if job.cancelled:
                self.counts["cancelled"] += 1
                continue
            try:
                logits, caches = self.batch.prefill(job.prompt)
                row = Row(job, TextStream(self.gen.decode, job.sampling.stop), self._seeded_state(job.sampling.seed))
                if self._advance(row, logits):
                    joining.append((row, caches))
            except Exception as e:  # noqa: BLE001 - fail this request, keep serving the others
                log.exception("prefill failed")
                job.emit(Event("", "error", error=f"{type(e).__name__}: {e}"))
        if joining:
            self.batch.regroup(list(range(len(self.rows))), [(caches, len(row.job.prompt)) for row, caches in joining])
            self.rows += [row for row, _ in joining]
        return True

    def _step(self) -> None:
        cancelled = [row.job.cancelled for row in self.rows]
        if any(cancelled):
            self.counts["cancelled"] += sum(cancelled)
            self._keep([not c for c in cancelled])
            if not self.rows:
                return
        logits = self.batch.step([row.next_token for row in self.rows])
        self._keep([self._advance(row, logits[b]) for b, row in enumerate(self.rows)])

    def _keep(self, alive: list[bool]) -> None:
        if not all(alive):
            self.batch.regroup([b for b, ok in enumerate(alive) if ok], [])
            self.rows = [row for row, ok in zip(self.rows, alive) if ok]

    def _advance(self, row: Row, logits: torch.Tensor) -> bool:
        """Samples the row's next token from its logits (V,) and sends the text; False once the row is done."""
        s = row.job.sampling
        token = self._draw(row, logits)
        row.generated += 1
        if token == self.gen.eos_id and not s.ignore_eos:
            return self._finish(row, row.text.flush(), "stop")
        piece, stopped = row.text.push(token)
        if stopped:
            return self._finish(row, piece, "stop")
        if row.generated >= s.max_tokens:
            return self._finish(row, piece + row.text.flush(), "length")
        if piece:
            row.job.emit(Event(piece))
        row.next_token = token
        return True

    def _finish(self, row: Row, piece: str, reason: str) -> bool:
        row.job.emit(Event(piece, reason, row.generated))
        self.counts["finished"] += 1
        return False

    def _draw(self, row: Row, logits: torch.Tensor) -> int:
        """Greedy, or one draw from the row's own random stream: k_model.sample draws from the default
        generator, so the row's state is swapped in for the draw (and the default's put back after). A
        seeded request thus gets the tokens it gets alone after torch.manual_seed(seed), whoever shares
        its batch."""
        s = row.job.sampling
        if s.temperature == 0:
            return int(logits.argmax())
        saved = self._get_rng()
        self._set_rng(row.rng_state)
        token = int(sample(logits[None], s.temperature, s.top_k, s.top_p)[0])
        row.rng_state = self._get_rng()
        self._set_rng(saved)
        return token

    def _seeded_state(self, seed: int | None) -> torch.Tensor:
        rng = torch.Generator(self.gen.device)
        if seed is None:
            rng.seed()  # a fresh random seed
        else:
            rng.manual_seed(seed)
        return rng.get_state()


# ----------------------------------------------------------------------------------------------------------
# The API: OpenAI's request and response shapes


class APIError(Exception):
    """An error answered the way OpenAI answers one: {"error": {message, type, param, code}} with a status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        error = {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": error}, status_code=self.status)


def one_or_many(value: Any) -> Any:
    """OpenAI takes "x" for ["x"] (and null for []) in stop and prompt; a list from here on keeps errors simple."""
    return [value] if isinstance(value, str) else [] if value is None else value


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]  # the roles the chat template was trained with
    content: str

    @field_validator("content", mode="before")
    @classmethod
    def join_text_parts(cls, content: Any) -> Any:
        """Content may also be a list of parts, [{"type": "text", "text": "..."}, ...]: text parts only here."""
        if not isinstance(content, list):
            return content
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise ValueError('only text parts, {"type": "text", "text": "..."}, are supported')
        return "".join(p["text"] for p in content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class GenerationRequest(BaseModel):
    """The fields both endpoints take. Other OpenAI fields (logprobs, tools, user, ...) are ignored."""
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    stop: list[Annotated[str, Field(min_length=1)]] = Field([], max_length=4)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # what torch.manual_seed takes
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)
    top_k: int | None = Field(None, ge=1)  # not OpenAI's; vLLM's name for it
    ignore_eos: bool = False  # not OpenAI's; vLLM's: generate exactly max_tokens (benchmarks)

    _stop_list = field_validator("stop", mode="before")(one_or_many)


class ChatRequest(GenerationRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens


class CompletionRequest(GenerationRequest):
    prompt: list[str] = Field(min_length=1, max_length=1)  # one prompt: "text", or ["text"]

    _prompt_list = field_validator("prompt", mode="before")(one_or_many)


Body = TypeVar("Body", bound=BaseModel)


async def parse_body(request: Request, schema: type[Body]) -> Body:
    try:
        data = json.loads(await request.body())
    except ValueError as e:  # includes bytes that are not UTF-8
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(part) for part in err["loc"])
        got = "" if err["type"] == "missing" else f" (got {json.dumps(err['input'], ensure_ascii=False)[:80]})"
        raise APIError(400, f"invalid '{param}': {err['msg']}{got}", param=param) from None


@dataclass
class Defaults:
    """What a request gets for the fields it leaves out."""
    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9


def create_app(gen: TextGenerator, model_name: str, max_batch: int = 16, api_key: str | None = None,
               defaults: Defaults | None = None) -> FastAPI:
    """The FastAPI app serving `gen` under `model_name`; its engine thread runs while the app is served."""
    defaults = defaults or Defaults()
    engine = Engine(gen, max_batch)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.stop()

    # no /docs: the request bodies are parsed by hand (OpenAI-shaped errors), and its page loads from a CDN
    app = FastAPI(title="k_model serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:  # unknown path, wrong method
        return APIError(e.status_code, str(e.detail)).response()

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "invalid or missing API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    def check_model(request: Request, name: str) -> None:
        check_key(request)
        if name != model_name:
            raise APIError(404, f"the model '{name}' does not exist; this server serves '{model_name}'",
                           param="model", code="model_not_found")

    def new_job(req: GenerationRequest, prompt: list[int], wanted: int, what: str) -> Job:
        room = gen.context_len - len(prompt)
        if room < 1:
            raise APIError(400, f"the {what} is {len(prompt)} tokens; the model's context is {gen.context_len} "
                                "tokens, which must also hold the reply", param=what, code="context_length_exceeded")
        temperature = defaults.temperature if req.temperature is None else req.temperature
        top_p = defaults.top_p if req.top_p is None else req.top_p
        sampling = Sampling(max_tokens=min(wanted, room), temperature=0.0 if top_p == 0 else temperature,
                            top_p=top_p, top_k=req.top_k, stop=req.stop, seed=req.seed, ignore_eos=req.ignore_eos)
        job = Job(prompt, sampling)
        engine.submit(job)
        return job

    @app.get("/", response_class=HTMLResponse)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(CHAT_PAGE.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, **engine.stats()}

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        check_key(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(request: Request, name: str) -> dict[str, Any]:
        check_model(request, name)
        return model_card()

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": int(time.time()), "owned_by": "k_model",
                "context_length": gen.context_len}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        req = await parse_body(request, ChatRequest)
        check_model(request, req.model)
        wanted = req.max_completion_tokens or req.max_tokens or defaults.max_tokens
        messages = [m.model_dump() for m in req.messages]
        # as the chat REPL does: drop the oldest turns until the conversation and the reply fit the context
        kept = gen.trim_history(messages, wanted)
        job = new_job(req, gen.chat_ids(kept), wanted, "messages")
        trimmed = {"trimmed_messages": len(messages) - len(kept)} if len(kept) < len(messages) else {}
        return await respond(job, req, chat=True, extra=trimmed)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        req = await parse_body(request, CompletionRequest)
        check_model(request, req.model)
        # the text starts a new document, after an EOS, exactly as model_sample.py --mode pretrain begins one
        job = new_job(req, gen.document_ids(req.prompt[0]), req.max_tokens or defaults.max_tokens, "prompt")
        return await respond(job, req, chat=False, extra={})

    async def respond(job: Job, req: GenerationRequest, chat: bool, extra: dict[str, Any]) -> Any:
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": model_name, **extra}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(sse(job, head, chat, include_usage), media_type="text/event-stream")
        text, last = "", Event("")
        try:
            async for last in job.events():
                text += last.text
        finally:
            job.cancelled = True  # a no-op once it finished; frees the row if this handler is cancelled
        if last.error:
            raise APIError(500, f"generation failed: {last.error}", kind="server_error")
        return {**head, "object": "chat.completion" if chat else "text_completion",
                "choices": [choice(chat, text, last.finish_reason, stream=False)], "usage": usage(job, last)}

    async def sse(job: Job, head: dict[str, Any], chat: bool, include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events: a chunk per piece of text, the finish_reason, optionally usage, [DONE]."""
        kind = "chat.completion.chunk" if chat else "text_completion"

        def event(body: dict[str, Any]) -> str:
            return f"data: {json.dumps({**head, 'object': kind, **body}, ensure_ascii=False)}\n\n"

        try:
            if chat:  # OpenAI's first chunk names the role
                yield event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                          "logprobs": None, "finish_reason": None}]})
            async for ev in job.events():
                if ev.error:
                    yield f"data: {json.dumps({'error': {'message': ev.error, 'type': 'server_error'}})}\n\n"
                    return
                if ev.text:
                    yield event({"choices": [choice(chat, ev.text, None, stream=True)]})
                if ev.finish_reason:
                    yield event({"choices": [choice(chat, "", ev.finish_reason, stream=True)]})
                    if include_usage:
                        yield event({"choices": [], "usage": usage(job, ev)})
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled = True  # the client went away mid-stream (or has everything): free its row

    return app


def choice(chat: bool, text: str, finish_reason: str | None, stream: bool) -> dict[str, Any]:
    if not chat:
        body: dict[str, Any] = {"text": text}
    elif stream:
        body = {"delta": {"content": text} if text else {}}
    else:
        body = {"message": {"role": "assistant", "content": text}}
    return {"index": 0, **body, "logprobs": None, "finish_reason": finish_reason}


def usage(job: Job, last: Event) -> dict[str, int]:
    return {"prompt_tokens": len(job.prompt), "completion_tokens": last.completion_tokens,
            "total_tokens": len(job.prompt) + last.completion_tokens}


# ----------------------------------------------------------------------------------------------------------
# Command line


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="out/sft", help="ckpt.pt, run dir or HF export (as model_sample.py opens)")
    p.add_argument("--tokenizer_path", default=None,
                   help="tokenizer dir (default: the HF export's own, else out/tokenizer)")
    p.add_argument("--model_name", default=None, help="the name clients ask for (default: --model as given)")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 listens on every interface: use --api_key then")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api_key", default=os.environ.get("SERVE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $SERVE_API_KEY, which ps does not "
                        "show)")
    p.add_argument("--max_batch", type=positive_int, default=16,
                   help="requests decoded together; 1 = one at a time, in order")
    p.add_argument("--no_compile", action="store_true",
                   help="decode eagerly; by default the one-token step is compiled before serving (tens of seconds "
                        "on a CPU, then faster steps; eager if compiling fails)")
    p.add_argument("--max_tokens", type=positive_int, default=Defaults.max_tokens,
                   help="reply length when a request gives none")
    p.add_argument("--temperature", type=float, default=Defaults.temperature, help="when a request gives none")
    p.add_argument("--top_p", type=float, default=Defaults.top_p, help="when a request gives none")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="auto = bfloat16 on CUDA and on CPUs with native bf16, else float32")
    p.add_argument("--log_level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = build_parser()
    args = parser.parse_args(argv)
    if not (0 <= args.temperature <= 2 and 0 <= args.top_p <= 1):
        parser.error("--temperature must be in [0, 2] and --top_p in [0, 1], the ranges a request may ask for")
    try:
        gen = TextGenerator(args.model, args.tokenizer_path, args.device, args.dtype)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    if not args.no_compile:
        gen.compile_decode((1, 2) if args.max_batch > 1 else (1,))
    name = args.model_name or args.model
    app = create_app(gen, name, args.max_batch, args.api_key, Defaults(args.max_tokens, args.temperature, args.top_p))
    print(f"serving {gen.info['source']} as '{name}' ({gen.model.num_params() / 1e6:.2f}M params, context "
          f"{gen.context_len}, {gen.device} {str(gen.dtype).removeprefix('torch.')}) "
          f"on http://{args.host}:{args.port}/ "
          f"(API under /v1){' with an API key' if args.api_key else ''}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
