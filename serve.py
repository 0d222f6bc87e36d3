"""Serve a trained model over an OpenAI-compatible HTTP API, with a web chat page.

    python serve.py                                  # out/sft on http://127.0.0.1:8000 (the chat page is at /)
    python serve.py --model out/pretrain --port 8001 # a pretrained model: use /v1/completions
    python serve.py --api_key secret                 # /v1/* then need "Authorization: Bearer secret"
    python serve.py --max_batch 1                    # one request at a time, the others wait in a queue
    python serve.py --no_compile                     # start at once and decode eagerly

Endpoints: GET / (chat page), GET /health, GET /v1/models, POST /v1/chat/completions, POST /v1/completions.
The official `openai` client works unchanged: OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-").
Both endpoints answer logprobs (chat: logprobs, top_logprobs; completions: logprobs N, with echo the prompt's
too, and prompts of token ids: what `lm_eval --model local-completions` scores a model with) and take OpenAI's
presence and frequency penalties; OpenAI fields not built here (response_format, functions, ...) get a 400.
Chat takes OpenAI's tools (tool_choice, parallel_tool_calls; assistant tool_calls and tool messages in the
conversation) and answers message.tool_calls and reasoning_content, streamed too (docs/serve_tools.md);
chat_template_kwargs {"enable_thinking": false} asks a thinking model to answer at once, as vLLM takes it.

The model is loaded by TextGenerator (support/inference/text_generator.py: any ckpt.pt, run dir or HF export,
its tokenizer) and decoded by one engine thread (generation_engine.Engine). Requests that arrive while others are generating
join the running batch at the next token (continuous batching, up to --max_batch rows). A row leaves as soon
as it finishes or its client goes away (streamed or not), so a slow client never holds a fast one back. The
step is compiled before the server starts, for every batch size up to --max_batch (TextGenerator.
compile_decode), and reads packed copies of the weights (Transformer.packed_weights).

One client cannot cost the others more than its share (Limits): the API key is checked before the body is
read, bodies, conversations and the waiting queue are capped (413, 400, 429 with Retry-After), tokenizing
runs off the event loop, and whatever fails for one request ends that request alone. If the engine itself
cannot go on, /health answers 503 and the process exits non-zero. SIGINT / SIGTERM give every running and
waiting request a last event ("the server is shutting down", 503), then the process exits.
"""
from __future__ import annotations

import argparse
import asyncio
import codecs
import contextlib
import dataclasses
import hmac
import json
import os
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Annotated, Any, Literal, TypeVar

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from jinja2 import TemplateError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from tokenizers import decoders, pre_tokenizers

from support.data.tokenizer_spec import TOOL_CALL_START
from support.inference.generation_engine import Engine, EngineUnavailable, Event, Job, QueueFull, Sampling, TokenLogprob
from support.inference.tool_calls import ReplyStream, parse_reply
from support.loading.sources import DTYPES
from model_sample import add_context_shift_flags
from support.inference.text_generator import TextGenerator

CHAT_PAGE = Path(__file__).resolve().parent / "static" / "chat.html"


# ----------------------------------------------------------------------------------------------------------
# The API: OpenAI's request and response shapes


class APIError(Exception):
    """An error answered the way OpenAI answers one: {"error": {message, type, param, code}} with a status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers

    def response(self) -> JSONResponse:
        error = {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": error}, status_code=self.status, headers=self.headers)


def one_or_many(value: Any) -> Any:
    """OpenAI takes "x" for ["x"] (and null for []) in stop; a list from here on keeps errors simple."""
    return [value] if isinstance(value, str) else [] if value is None else value


def one_prompt(value: Any) -> Any:
    """OpenAI's prompt is a string, a list of token ids, or a list of several of either; this server takes one
    (a list of several is refused). Token ids are checked against the vocabulary later, where it is known."""
    if isinstance(value, list) and value and all(isinstance(p, (str, list)) for p in value):
        if len(value) > 1:
            raise ValueError(f"{len(value)} prompts; this server takes one per request")
        value = value[0]
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(type(t) is int and t >= 0 for t in value):
        return value
    raise ValueError("a prompt is a string or a non-empty list of token ids (integers >= 0)")


# OpenAI request fields this server has not built, with the value that asks for nothing: another value is
# refused (400), not ignored, or a client asking for JSON output or tool calls would silently get neither
# (the legacy functions / function_call: tools / tool_choice are their replacement, built here)
UNSUPPORTED = {"response_format": {"type": "text"}, "functions": [], "function_call": "none", "logit_bias": {},
               "suffix": "", "best_of": 1}
TOOL_NAME = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for function names


class FunctionCall(BaseModel):
    name: str = Field(pattern=TOOL_NAME)
    arguments: str  # JSON, as the API sends it (the template writes it into the prompt as it is)

    @field_validator("arguments")
    @classmethod
    def json_object(cls, arguments: str) -> str:
        try:
            value = json.loads(arguments)
        except json.JSONDecodeError as e:
            raise ValueError(f"arguments are not JSON: {e}") from None
        if not isinstance(value, dict):
            raise ValueError("arguments must be a JSON object")
        return arguments


class MessageToolCall(BaseModel):
    """A call an assistant message made (its reply from this server, sent back with the conversation)."""
    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]  # the roles the chat template was trained with
    content: str | None = None  # null only for an assistant message that made tool calls
    reasoning_content: str | None = None  # an assistant's thinking (rendered in <think>)
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None  # a tool message: the call whose result it is

    @field_validator("content", mode="before")
    @classmethod
    def join_text_parts(cls, content: Any) -> Any:
        """Content may also be a list of parts, [{"type": "text", "text": "..."}, ...]: text parts only here."""
        if not isinstance(content, list):
            return content
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise ValueError('only text parts, {"type": "text", "text": "..."}, are supported')
        return "".join(p["text"] for p in content)

    @model_validator(mode="after")
    def fields_of_its_role(self) -> Message:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("'content' is required (null only in an assistant message with 'tool_calls')")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError(f"a {self.role} message has no 'tool_calls' (only an assistant's)")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the 'tool_call_id' of the call whose result it is")
        return self


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="allow")  # e.g. strict: rendered into the prompt as the client sent it
    name: str = Field(pattern=TOOL_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema


class Tool(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["function"]
    function: FunctionDefinition


class TemplateKwargs(BaseModel):
    """vLLM's chat_template_kwargs: what the chat template reads besides the messages (here: enable_thinking)."""
    model_config = ConfigDict(extra="forbid")
    enable_thinking: bool | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class GenerationRequest(BaseModel):
    """The fields both endpoints take. OpenAI fields this server has not built are refused (UNSUPPORTED) and
    the ones that change nothing in the answer (user, metadata, ...) ignored. null stands for "the default"
    wherever OpenAI allows it."""
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    stop: list[Annotated[str, Field(min_length=1)]] = Field([], max_length=4)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # what torch.manual_seed takes
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    top_k: int | None = Field(None, ge=1)  # not OpenAI's; vLLM's name for it
    ignore_eos: bool = False  # not OpenAI's; vLLM's: generate exactly max_tokens (benchmarks)

    _stop_list = field_validator("stop", mode="before")(one_or_many)


class ChatRequest(GenerationRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None  # "none" | "auto" | "required" | a named function
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: TemplateKwargs | None = None

    @field_validator("tool_choice", mode="before")
    @classmethod
    def known_choice(cls, choice: Any) -> Any:
        named = isinstance(choice, dict) and choice.get("type") == "function" and isinstance(
            (choice.get("function") or {}).get("name"), str)
        if choice is None or choice in ("none", "auto", "required") or named:
            return choice
        raise ValueError('tool_choice is "none", "auto", "required" or {"type": "function", "function": '
                         '{"name": NAME}}')


class CompletionRequest(GenerationRequest):
    prompt: str | list[int]
    logprobs: int | None = Field(None, ge=0, le=5)  # the chosen token's and this many most likely tokens'
    echo: bool | None = None  # the reply starts with the prompt (and, with logprobs, the prompt tokens' logprobs)

    _one_prompt = field_validator("prompt", mode="before")(one_prompt)


@dataclass
class ToolUse:
    """What a chat request's tools make of its prompt and its reply."""
    offered: list[dict] | None = None  # the tool definitions the prompt lists (None: none)
    readable: list[dict] = dataclasses.field(default_factory=list)  # tools whose calls the reply is read for
    forced: str = ""  # the start of a call written in the reply's place (tool_choice "required" or named)
    parallel: bool = True  # False: only the reply's first call counts


def tool_use(req: ChatRequest) -> ToolUse:
    """The request's tools, tool_choice and parallel_tool_calls, checked against each other. "none" leaves the
    tools out of the prompt and reads no calls; "required" and a named function force a call by writing its
    start in front of the reply (the model generates the rest): the marker, and for a name the JSON up to the
    arguments. It stops at the colon: the space after it starts the arguments' first token in training text."""
    tools = [t.model_dump(exclude_unset=True) for t in req.tools or []]
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) < len(names):
        raise APIError(400, f"two tools have the same name in 'tools' ({', '.join(names)})", param="tools")
    choice = req.tool_choice or "auto"
    if choice not in ("none", "auto") and not tools:
        raise APIError(400, f"tool_choice {json.dumps(choice)} needs 'tools'", param="tool_choice")
    if choice == "none" or not tools:
        return ToolUse()
    forced = TOOL_CALL_START if choice == "required" else ""
    if isinstance(choice, dict):
        name = choice["function"]["name"]
        if name not in names:
            raise APIError(400, f"tool_choice names the function '{name}', which is not in 'tools' "
                                f"({', '.join(names)})", param="tool_choice")
        forced = TOOL_CALL_START + '{"name": ' + json.dumps(name) + ', "arguments":'
    return ToolUse(tools, tools, forced, req.parallel_tool_calls is not False)


def check_tool_messages(messages: list[Message]) -> None:
    """Each tool message is the result of a call an assistant message made before it."""
    made: set[str] = set()
    for i, m in enumerate(messages):
        made |= {call.id for call in m.tool_calls or []}
        if m.role == "tool" and m.tool_call_id not in made:
            raise APIError(400, f"messages[{i}] is the result of the tool call '{m.tool_call_id}', which no earlier "
                                "assistant message made (its tool_calls ids)", param=f"messages.{i}.tool_call_id")


def check_no_control_tokens(req: ChatRequest, control: list[str]) -> None:
    """Tool definitions and call arguments are written into the prompt as the template's own text (only message
    text is always encoded as text): a control token in them would be one, and could forge a turn."""
    fields = {"tools": json.dumps([t.model_dump(exclude_unset=True) for t in req.tools or []], ensure_ascii=False)}
    for i, m in enumerate(req.messages):
        for k, call in enumerate(m.tool_calls or []):
            fields[f"messages.{i}.tool_calls.{k}.function.arguments"] = call.function.arguments
    for param, text in fields.items():
        if found := next((t for t in control if t in text), None):
            raise APIError(400, f"'{param}' holds the control token {found}; write '<' as \\u003c in its JSON "
                                "strings", param=param)


Body = TypeVar("Body", bound=BaseModel)
Result = TypeVar("Result")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it is known to exceed `limit` bytes: by its Content-Length before
    reading it, else while it arrives."""
    too_large = APIError(413, f"the request body is larger than this server's limit of {limit} bytes "
                              "(serve.py --max_body_bytes)", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


async def parse_body(request: Request, schema: type[Body], limit: int) -> Body:
    try:
        data = json.loads(await read_body(request, limit))
    except ValueError as e:  # includes bytes that are not UTF-8
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    except RecursionError:  # arrays or objects nested thousands deep
        raise APIError(400, "the request body is nested too deeply to parse") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    for key, nothing in UNSUPPORTED.items():
        if data.get(key) not in (None, nothing):
            raise APIError(400, f"'{key}' is not supported by this server (only {json.dumps(nothing)} or null)",
                           param=key, code="unsupported_parameter")
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


@dataclass
class Limits:
    """What one client may ask of the server (each a serve.py flag of the same name)."""
    max_body_bytes: int = 1_000_000  # a full 2,048-token context is ~10 KB of text; 1 MB leaves room for JSON
    max_messages: int = 1000  # messages in one conversation (the oldest are trimmed to fit the context anyway)
    max_waiting: int = 256  # requests waiting for a row or to be tokenized; more get 429 with Retry-After
    max_tokens_limit: int = 4096  # a reply's tokens; past the context window it goes on by the context shift


def create_app(gen: TextGenerator, model_name: str, max_batch: int = 16, api_key: str | None = None,
               defaults: Defaults | None = None, limits: Limits | None = None) -> FastAPI:
    """The FastAPI app serving `gen` under `model_name`; its engine thread runs while the app is served."""
    defaults = defaults or Defaults()
    limits = limits or Limits()
    engine = Engine(gen, max_batch, limits.max_waiting)
    tokenizing = ThreadPoolExecutor(1, thread_name_prefix="tokenize")  # off the event loop, one at a time
    in_tokenizer = 0  # requests handed to the tokenizing thread and not back yet: one is tokenized, the rest wait
    pieces = TokenPieces(gen.tokenizer)
    control_tokens = list(gen.tokenizer.get_added_vocab())
    # a text prompt starts a new document, after an EOS, exactly as model_sample.py --mode pretrain begins one:
    # the ids before the text's own
    document_start = len(gen.document_ids(""))

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.stop()
        tokenizing.shutdown(wait=False, cancel_futures=True)

    # no /docs: the request bodies are parsed by hand (OpenAI-shaped errors), and its page loads from a CDN
    app = FastAPI(title="k_model serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:  # unknown path, wrong method
        return APIError(e.status_code, str(e.detail)).response()

    @app.exception_handler(Exception)
    async def unexpected(_: Request, e: Exception) -> JSONResponse:  # a bug: still an answer clients can parse
        return APIError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error").response()

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "invalid or missing API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"the model '{name}' does not exist; this server serves '{model_name}'",
                           param="model", code="model_not_found")

    def busy(reason: str) -> APIError:
        return APIError(429, f"the server is busy: {reason}; retry later", code="queue_full", kind="rate_limit_error",
                        headers={"Retry-After": "1"})

    async def off_loop(fn: Callable[..., Result], *args: Any) -> Result:
        """fn(*args) in the tokenizing thread: a long prompt must not stall the other clients' requests. The
        requests waiting for that thread count toward --max_waiting with those waiting for a row: a few huge
        conversations cannot queue unseen in front of everyone else's."""
        nonlocal in_tokenizer
        if engine.waiting() + max(0, in_tokenizer - 1) >= limits.max_waiting:
            raise busy(f"{limits.max_waiting} requests are waiting already")
        in_tokenizer += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(tokenizing, fn, *args)
        finally:
            in_tokenizer -= 1

    def new_job(req: GenerationRequest, prompt: list[int], wanted: int, what: str, logprobs: int | None = None,
                score_from: int | None = None, chat: bool = False) -> Job:
        if len(prompt) >= gen.context_len:  # the reply may outgrow the window (context shift); the prompt may not
            raise APIError(400, f"the {what} is {len(prompt)} tokens; the model's context is {gen.context_len} "
                                "tokens, which must also hold the reply", param=what, code="context_length_exceeded")
        temperature = defaults.temperature if req.temperature is None else req.temperature
        top_p = defaults.top_p if req.top_p is None else req.top_p
        sampling = Sampling(max_tokens=min(wanted, limits.max_tokens_limit),
                            temperature=0.0 if top_p == 0 else temperature, top_p=top_p, top_k=req.top_k,
                            stop=req.stop, seed=req.seed, ignore_eos=req.ignore_eos, logprobs=logprobs,
                            presence_penalty=req.presence_penalty or 0.0,
                            frequency_penalty=req.frequency_penalty or 0.0,
                            skip_special_tokens=not chat)  # a chat reply is read by its markers (Reply)
        job = Job(prompt, sampling, score_from)
        try:
            engine.submit(job)
        except QueueFull as e:
            raise busy(str(e)) from None
        except EngineUnavailable as e:
            raise APIError(503, str(e), kind="server_error") from None
        return job

    @app.get("/", response_class=HTMLResponse)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(CHAT_PAGE.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health() -> JSONResponse:
        stats = {"model": model_name, **engine.stats(), "tokenizing": in_tokenizer}
        if engine.failure:
            return JSONResponse({"status": "failed", "error": engine.failure.message, **stats}, status_code=503)
        return JSONResponse({"status": "ok", **stats})

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        check_key(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(request: Request, name: str) -> dict[str, Any]:
        check_key(request)
        check_model(name)
        return model_card()

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": int(time.time()), "owned_by": "k_model",
                "context_length": gen.context_len}

    def trimmed_chat(messages: list[dict], wanted: int, tools: ToolUse,
                     thinking: bool | None) -> tuple[list[dict], list[int]]:
        # as the chat REPL does: drop the oldest turns until the conversation and the reply fit the context;
        # trim_history measures the messages alone, so the tool list and the forced call start count as reply
        forced = gen.tokenizer(tools.forced, add_special_tokens=False)["input_ids"] if tools.forced else []
        extra = len(forced)
        if tools.offered or thinking is not None:
            probe = [{"role": "user", "content": ""}]
            extra += len(gen.chat_ids(probe, tools.offered, thinking)) - len(gen.chat_ids(probe))
        kept = gen.trim_history(messages, wanted + extra)
        return kept, gen.chat_ids(kept, tools.offered, thinking) + forced

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        check_key(request)  # before the body: a client without the key costs no reading and no parsing
        req = await parse_body(request, ChatRequest, limits.max_body_bytes)
        check_model(req.model)
        if len(req.messages) > limits.max_messages:
            raise APIError(400, f"{len(req.messages)} messages; this server takes at most {limits.max_messages} "
                                "(serve.py --max_messages)", param="messages")
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        tools = tool_use(req)
        check_tool_messages(req.messages)
        check_no_control_tokens(req, control_tokens)
        thinking = req.chat_template_kwargs.enable_thinking if req.chat_template_kwargs else None
        wanted = req.max_completion_tokens or req.max_tokens or defaults.max_tokens
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        try:
            kept, prompt = await off_loop(trimmed_chat, messages, wanted, tools, thinking)
        except TemplateError as e:  # e.g. a Llama 2 / Mistral template's raise_exception for a system prompt
            raise APIError(400, f"the model's chat template refuses these messages: {e}", param="messages") from None
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        job = new_job(req, prompt, wanted, "messages", logprobs, chat=True)
        trimmed = {"trimmed_messages": len(messages) - len(kept)} if len(kept) < len(messages) else {}
        reply = Reply(chat=True, logprobs=logprobs, pieces=pieces, tools=tools)
        return await respond(request, job, req, reply, trimmed)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        check_key(request)
        req = await parse_body(request, CompletionRequest, limits.max_body_bytes)
        check_model(req.model)
        if isinstance(req.prompt, str):
            prompt, text_from, echo = await off_loop(gen.document_ids, req.prompt), document_start, req.prompt
        else:  # token ids are the client's own: taken as they are (what lm-eval's local-completions sends)
            if (bad := max(req.prompt)) >= gen.model.config.vocab_size:
                raise APIError(400, f"token id {bad} is outside the model's vocabulary of "
                                    f"{gen.model.config.vocab_size}", param="prompt")
            prompt, text_from = req.prompt, 0
            echo = await off_loop(gen.decode, prompt) if req.echo else ""
        job = new_job(req, prompt, req.max_tokens or defaults.max_tokens, "prompt", req.logprobs,
                      text_from if req.echo else None)
        reply = Reply(chat=False, logprobs=req.logprobs, pieces=pieces, echo=echo if req.echo else "")
        return await respond(request, job, req, reply, {})

    async def respond(request: Request, job: Job, req: GenerationRequest, reply: Reply, extra: dict[str, Any]) -> Any:
        head = {"id": f"{'chatcmpl' if reply.chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": model_name, **extra}
        if req.stream:  # StreamingResponse itself stops the stream (and so frees the row) on a disconnect
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(sse(job, head, reply, include_usage), media_type="text/event-stream")
        watcher = asyncio.create_task(cancel_on_disconnect(request, job))
        text, entries, last = "", [], Event("")
        try:
            async for last in reply.events(job):
                text += last.text
                entries += last.logprobs
        finally:
            watcher.cancel()
            job.cancelled = True  # a no-op once it finished; frees the row if this handler is cancelled
        if last.finish_reason == "cancelled":
            return Response(status_code=499)  # nobody reads it: the client has gone (nginx's code for that)
        if last.failure:
            failure = last.failure
            raise APIError(failure.status, f"generation failed: {failure.message}", kind="server_error")
        return {**head, "object": "chat.completion" if reply.chat else "text_completion",
                "choices": [reply.choice(text, entries, last.finish_reason, stream=False)], "usage": usage(job, last)}

    async def sse(job: Job, head: dict[str, Any], reply: Reply, include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events: a chunk per piece of text, the finish_reason, optionally usage, [DONE]."""
        kind = "chat.completion.chunk" if reply.chat else "text_completion"

        def event(body: dict[str, Any]) -> str:
            return f"data: {json.dumps({**head, 'object': kind, **body}, ensure_ascii=False)}\n\n"

        try:
            if reply.chat:  # OpenAI's first chunk names the role
                yield event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                          "logprobs": None, "finish_reason": None}]})
            async for ev in reply.events(job):
                if ev.failure:
                    error = {"message": ev.failure.message, "type": "server_error", "code": ev.failure.status}
                    yield f"data: {json.dumps({'error': error})}\n\n"
                    return
                if ev.text or ev.logprobs:
                    choice = reply.choice(ev.text, ev.logprobs, None, stream=True)
                    if choice.get("delta") != {} or choice["logprobs"]:  # a chat reply's text may wait (ReplyStream)
                        yield event({"choices": [choice]})
                if ev.finish_reason:
                    yield event({"choices": [reply.choice("", [], ev.finish_reason, stream=True)]})
                    if include_usage:
                        yield event({"choices": [], "usage": usage(job, ev)})
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled = True  # the client went away mid-stream (or has everything): free its row

    return app


class TokenPieces:
    """How the API shows a token: its text (special tokens by name) and its bytes. A byte-level BPE token's
    bytes are exact, also where it holds part of a character (its text then shows U+FFFD); other tokenizers'
    tokens show their text's UTF-8."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.special = set(tokenizer.all_special_ids)
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self.byte_of = byte_level_bytes() if isinstance(decoder, decoders.ByteLevel) else {}
        self.known: dict[int, tuple[str, bytes]] = {}

    def __call__(self, token: int) -> tuple[str, bytes]:
        if token not in self.known:
            text, piece = self.tokenizer.decode([token]), self.tokenizer.convert_ids_to_tokens(token)
            exact = self.byte_of and all(c in self.byte_of for c in piece)
            self.known[token] = text, bytes(self.byte_of[c] for c in piece) if exact else text.encode()
        return self.known[token]

    def shown(self, token: int, logprob: float | None) -> dict[str, Any]:
        """One token of chat's logprobs."""
        text, raw = self(token)
        return {"token": text, "logprob": logprob, "bytes": list(raw)}

    def offsets(self, tokens: list[int], start: int) -> list[int]:
        """Where each token's text begins in a text that reaches `start` characters before them: their bytes
        decoded one token at a time, so a token that goes on with a character split across tokens begins where
        the character does; special tokens, which the decoded text leaves out, add nothing."""
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        offsets, chars = [], start
        for token in tokens:
            raw = b"" if token in self.special else self(token)[1]
            # the decoder holds the start of a character back; unless this token goes on with it, it becomes a
            # U+FFFD before this token's text
            held = decoder.getstate()[0]
            offsets.append(chars + (bool(held) and not (raw and 0x80 <= raw[0] < 0xC0)))
            chars += len(decoder.decode(raw))
        return offsets


def byte_level_bytes() -> dict[str, int]:
    """The byte each character of byte-level BPE's alphabet stands for: the printable Latin-1 bytes for
    themselves, the other 68 (control bytes, space, NBSP, soft hyphen) for U+0100 on, in byte order."""
    themselves = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in themselves]
    byte_of = {chr(b): b for b in themselves} | {chr(0x100 + n): b for n, b in enumerate(others)}
    assert set(byte_of) == set(pre_tokenizers.ByteLevel.alphabet())  # the tokenizers library's own alphabet
    return byte_of


@dataclass
class Reply:
    """How a job's events reach its client: as chat or as a completion, with OpenAI's logprobs of either kind
    when asked for (`logprobs`: how many most likely tokens to show beside each), and an echoed prompt in front.
    A chat reply's text (with its markers) is read for reasoning and the calls of `tools` (tool_calls.py)."""
    chat: bool
    logprobs: int | None
    pieces: TokenPieces
    echo: str = ""
    chars: int = 0  # characters of the completion's text before the next event's (its text offsets)
    tools: ToolUse = dataclasses.field(default_factory=ToolUse)
    stream: ReplyStream | None = None  # a streamed chat reply as read so far
    calls_sent: int = 0

    async def events(self, job: Job) -> AsyncIterator[Event]:
        """The job's events, the echoed prompt in front of the first one's text."""
        echo = self.echo
        async for event in job.events():
            if echo:
                event, echo = dataclasses.replace(event, text=echo + event.text), ""
            yield event

    def choice(self, text: str, entries: list[TokenLogprob], finish_reason: str | None,
               stream: bool) -> dict[str, Any]:
        if not self.chat:
            body: dict[str, Any] = {"text": text}
        elif stream:
            body = {"delta": self.delta(text, finished=finish_reason is not None)}
            finish_reason = "tool_calls" if finish_reason and self.calls_sent else finish_reason
        else:
            body = {"message": self.message(text)}
            finish_reason = "tool_calls" if "tool_calls" in body["message"] else finish_reason
        logprobs = None
        if self.logprobs is not None and (entries or not stream):
            logprobs = self.chat_logprobs(entries) if self.chat else self.completion_logprobs(entries, text)
        return {"index": 0, **body, "logprobs": logprobs, "finish_reason": finish_reason}

    def message(self, text: str) -> dict[str, Any]:
        """The whole reply as OpenAI's message: content, reasoning_content, tool_calls (those present)."""
        reply = parse_reply(self.tools.forced + text, self.tools.readable)
        message: dict[str, Any] = {"role": "assistant", "content": reply.answer()}
        if reply.reasoning:
            message["reasoning_content"] = reply.reasoning
        if calls := reply.tool_calls[: None if self.tools.parallel else 1]:
            message["tool_calls"] = [call.openai(new_call_id()) for call in calls]
        return message

    def delta(self, text: str, finished: bool) -> dict[str, Any]:
        """What `text` adds to a streamed reply (with `finished`, what was held back too), as OpenAI's delta:
        reasoning_content and content pieces, and each call once it is complete, whole, in a chunk."""
        if self.stream is None:
            self.stream = ReplyStream(self.tools.readable)
            self.stream.push(self.tools.forced)  # an unfinished call: nothing to send yet
        new = self.stream.push(text) if not finished else self.stream.finish()
        delta: dict[str, Any] = {}
        if new.reasoning:
            delta["reasoning_content"] = new.reasoning
        if new.content:
            delta["content"] = new.content
        calls = []
        for call in new.tool_calls:
            if self.tools.parallel or self.calls_sent == 0:
                calls.append({"index": self.calls_sent, **call.openai(new_call_id())})
                self.calls_sent += 1
        if calls:
            delta["tool_calls"] = calls
        return delta

    def chat_logprobs(self, entries: list[TokenLogprob]) -> dict[str, Any]:
        shown = self.pieces.shown
        return {"content": [{**shown(e.token, e.logprob), "top_logprobs": [shown(t, lp) for t, lp in e.top]}
                            for e in entries], "refusal": None}

    def completion_logprobs(self, entries: list[TokenLogprob], text: str) -> dict[str, Any]:
        """The legacy shape: parallel lists; each top_logprobs dict also holds the chosen token, as OpenAI's does
        (a prompt's first token has null for both)."""
        def top(e: TokenLogprob) -> dict[str, float] | None:
            text_of = lambda t: self.pieces(t)[0]  # noqa: E731
            return None if e.logprob is None else {**{text_of(t): lp for t, lp in e.top}, text_of(e.token): e.logprob}

        tokens = [e.token for e in entries]
        offsets = self.pieces.offsets(tokens, self.chars)
        self.chars += len(text)
        return {"tokens": [self.pieces(t)[0] for t in tokens], "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [top(e) for e in entries], "text_offset": offsets}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


async def cancel_on_disconnect(request: Request, job: Job) -> None:
    """Cancels the job once its client hangs up (its body has been read, so the next message the server
    receives for it is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel()


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
    p.add_argument("--max_waiting", type=positive_int, default=Limits.max_waiting,
                   help="requests that may wait for a row; more get 429 with Retry-After")
    p.add_argument("--max_body_bytes", type=positive_int, default=Limits.max_body_bytes,
                   help="larger request bodies get 413 (checked before and while reading)")
    p.add_argument("--max_messages", type=positive_int, default=Limits.max_messages,
                   help="messages one conversation may have (400 beyond)")
    p.add_argument("--no_compile", action="store_true",
                   help="decode eagerly; by default the one-token step is compiled before serving (tens of seconds "
                        "on a CPU, then faster steps; eager if compiling fails)")
    p.add_argument("--max_tokens", type=positive_int, default=Defaults.max_tokens,
                   help="reply length when a request gives none")
    p.add_argument("--max_tokens_limit", type=positive_int, default=Limits.max_tokens_limit,
                   help="a request's max_tokens is capped to this; replies longer than the context window go on by "
                        "the context shift (--context_shift)")
    add_context_shift_flags(p)
    p.add_argument("--temperature", type=float, default=Defaults.temperature, help="when a request gives none")
    p.add_argument("--top_p", type=float, default=Defaults.top_p, help="when a request gives none")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="auto = bfloat16 on CUDA and on CPUs with native bf16, else float32")
    p.add_argument("--log_level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


class Server(uvicorn.Server):
    """uvicorn, which on SIGINT / SIGTERM first has the engine end every request (uvicorn alone would wait
    for running streams to finish) and stops when the engine fails."""

    def __init__(self, config: uvicorn.Config, engine: Engine):
        super().__init__(config)
        self.engine = engine
        engine.on_failure = self.stop

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        threading.Thread(target=self.engine.stop, name="stop-engine").start()  # not in the signal handler
        super().handle_exit(sig, frame)

    def stop(self) -> None:
        self.should_exit = True


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (0 <= args.temperature <= 2 and 0 <= args.top_p <= 1):
        parser.error("--temperature must be in [0, 2] and --top_p in [0, 1], the ranges a request may ask for")
    try:
        gen = TextGenerator(args.model, args.tokenizer_path, args.device, args.dtype, args.context_shift,
                            args.context_keep, args.context_len)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    if not args.no_compile:
        gen.compile_decode(max_batch=args.max_batch)
    name = args.model_name or args.model
    limits = Limits(args.max_body_bytes, args.max_messages, args.max_waiting, args.max_tokens_limit)
    app = create_app(gen, name, args.max_batch, args.api_key, Defaults(args.max_tokens, args.temperature, args.top_p),
                     limits)
    print(f"serving {gen.info['source']} as '{name}' ({gen.model.num_params() / 1e6:.2f}M params, context "
          f"{gen.context_len}, {gen.device} {str(gen.dtype).removeprefix('torch.')}) "
          f"on http://{args.host}:{args.port}/ "
          f"(API under /v1){' with an API key' if args.api_key else ''}", flush=True)
    server = Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level), app.state.engine)
    server.run()
    if app.state.engine.failure:
        sys.exit(f"error: {app.state.engine.failure.message}")


if __name__ == "__main__":
    main()
