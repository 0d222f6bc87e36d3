"""The generation engine behind serve.py: continuous batching of requests over one model, in one thread.

A request becomes a Job (a prompt and its Sampling). The engine thread admits waiting jobs while the batch
has room: each prompt is prefilled alone, then its KV cache is laid next to the others' (DecodeBatch), and
every step decodes one token for every row. Each row is a small state machine (RowState): it decodes until
it finishes (EOS, a stop string, its token budget), its client goes away, or something fails for it alone;
then it leaves the batch and the next waiting job takes its place. The engine itself is one too
(EngineState): starting, serving, then stopped (asked to) or failed (it could not go on). Every job gets a
last Event in every case, so no client is ever left waiting.
"""
from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import enum
import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import torch

from k_model import KVCache, Transformer
from support.inference.text_generator import TextGenerator
from support.model.context_shift import right_aligned_mask, shift_caches
from support.model.sampling import logprobs_of, penalize, sample

log = logging.getLogger("serve")

# Below this a temperature is answered greedily: logits divided by 1e-38 overflow float32 (inf, then NaN
# probabilities), and long before that sampling equals argmax except on exact ties.
MIN_TEMPERATURE = 1e-4


# ----------------------------------------------------------------------------------------------------------
# A request as the engine sees it


@dataclass
class Sampling:
    max_tokens: int  # may exceed what fits the context window: past it, the context shifts (DecodeBatch)
    temperature: float  # 0 = greedy
    top_p: float | None = None
    top_k: int | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False  # generate exactly max_tokens (benchmarks)
    logprobs: int | None = None  # None: none; k: each token's logprob and the k most likely tokens' at its place
    presence_penalty: float = 0.0  # OpenAI's penalties on tokens already generated in this reply (penalize)
    frequency_penalty: float = 0.0
    # False: the text keeps the chat markers the model writes (<think>, <tool_call>, ...: TextGenerator.
    # reply_text), which a chat reply is parsed by; the other special tokens are left out either way
    skip_special_tokens: bool = True

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)


@dataclass
class Failure:
    """Why a job ended without its answer, and the HTTP status that says whose fault it is."""
    message: str
    status: int = 500  # 503: the server is stopping or its engine is gone; try again later or elsewhere

    @classmethod
    def of(cls, error: BaseException) -> Failure:
        return cls(f"{type(error).__name__}: {error}")


SHUTTING_DOWN = Failure("the server is shutting down", 503)


@dataclass
class TokenLogprob:
    """A token and its log-probability where it stands, log-softmax of the model's raw logits (before any
    temperature or penalty, as OpenAI reports them), with the most likely tokens there, best first."""
    token: int
    logprob: float | None  # None: a prompt's first token, which nothing precedes
    top: list[tuple[int, float]]


@dataclass
class Event:
    """What the engine tells a job: more text, and on the last event why it ended and how many tokens were
    generated (the end-of-sequence token included). With Sampling.logprobs, `logprobs` holds the tokens this
    text came from (a token whose text was held back comes with the next event; the closing EOS, generated
    but not text, with the last; the tokens from a stop string on have none); the prompt's, when the job
    scores it, come in a first event of their own."""
    text: str
    finish_reason: str | None = None  # "stop" | "length" | "error" | "cancelled" (nobody reads it)
    completion_tokens: int = 0
    failure: Failure | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)


class Job:
    """A request between its HTTP handler (on the event loop) and the engine thread, which sends it events
    with call_soon_threadsafe. `cancelled` is set by the handler when its client goes away."""

    def __init__(self, prompt: list[int], sampling: Sampling, score_from: int | None = None):
        self.prompt = prompt
        self.sampling = sampling
        self.score_from = score_from  # with sampling.logprobs: the prompt's logprobs from this token on (echo)
        self.cancelled = False
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue[Event] = asyncio.Queue()

    def emit(self, event: Event) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is closed: the server is gone
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)

    def cancel(self) -> None:
        """Its client went away: the engine drops its row at the next step, and its handler, still awaiting
        events, gets a last one now (call on the event loop)."""
        self.cancelled = True
        self._events.put_nowait(Event("", "cancelled"))

    def fail(self, failure: Failure, generated: int = 0) -> None:
        self.emit(Event("", "error", generated, failure))

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
        self.starts: list[int] = []  # where each token's text begins (a character split across tokens: its start)
        self.text = ""
        self.sent = 0  # characters of self.text already handed out

    def push(self, token: int) -> tuple[str, bool]:
        """Adds a token; returns (new text that is safe to send, whether a stop string was reached)."""
        self.tokens.append(token)
        self.starts.append(len(self.text.rstrip("\ufffd")))
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

    def tokens_sent(self) -> int:
        """How many tokens the text handed out comes from: once a stop string is reached, the tokens before it."""
        return bisect.bisect_left(self.starts, self.sent)

    def _stop_prefix_len(self) -> int:
        tail = self.text[self.sent :]
        return max((k for s in self.stop for k in range(1, min(len(s), len(tail) + 1)) if tail.endswith(s[:k])),
                   default=0)

    def _release(self, end: int) -> str:
        piece, self.sent = self.text[self.sent : end], end
        return piece


# ----------------------------------------------------------------------------------------------------------
# The batch's KV caches


@dataclass
class Prefilled:
    """A prompt run alone: the caches of its prefill (batch 1) and how many tokens they hold."""
    caches: list[KVCache]
    length: int


@dataclass
class CachedRow:
    """Where a row of the next layout copies its keys and values from: row `index` of `caches`, its `length`
    tokens ending just before slot `end`."""
    caches: list[KVCache]
    index: int
    length: int
    end: int


class DecodeBatch:
    """The KV caches of the rows being decoded, laid side by side. Rows are right-aligned, so every row's
    newest token sits in the same cache slot and one forward step serves them all; a shorter row's first
    slots are padding, masked out. The layout is rebuilt only when rows join or leave. When the longest row
    fills the window, the context shifts (context_shift.shift_caches): each row drops just enough of its oldest
    tokens, all but its first `keep`, to leave `shift` slots free."""

    def __init__(self, model: Transformer, shift: int, keep: int):
        self.model = model
        self.shift, self.keep = shift, keep
        self.caches: list[KVCache] = []
        self.lengths: list[int] = []  # tokens cached per row
        self.key_mask: torch.Tensor | None = None  # (B, context_len): the cache slots each row attends to

    @property
    def width(self) -> int:
        return max(self.lengths, default=0)

    def prefill(self, prompt: list[int]) -> tuple[torch.Tensor, Prefilled]:
        """One prompt alone (as model.generate runs it): its next-token logits (V,) and its caches."""
        tokens = torch.tensor([prompt], device=self.model.device)
        caches = self.model.new_caches(1, tokens.device)
        logits, _, _ = self.model.prefill(tokens, torch.ones_like(tokens, dtype=torch.bool), caches)
        return logits[0], Prefilled(caches, len(prompt))

    def score(self, prompt: list[int], top: int) -> list[TokenLogprob]:
        """Each prompt token's logprob given the tokens before it, by the model's forward over the whole
        prompt (the logits eval_model.py scores with; all of them at once, prompt length x vocabulary floats);
        the first token has none."""
        tokens = torch.tensor(prompt, device=self.model.device)
        logits = self.model(tokens[None]).logits[0, :-1]
        return [TokenLogprob(prompt[0], None, []), *logprob_entries(logits, tokens[1:], top)]

    def regroup(self, keep: list[int], joining: list[Prefilled]) -> None:
        """The new batch: the kept rows (indices into the current one, in order), then the joining ones. All
        or nothing: if the new caches cannot be made (out of memory), the batch stays as it was."""
        rows = [CachedRow(self.caches, i, self.lengths[i], self.width) for i in keep]
        rows += [CachedRow(p.caches, 0, p.length, p.length) for p in joining]
        lengths = [row.length for row in rows]
        width, device = max(lengths, default=0), self.model.device
        caches = self.model.new_caches(len(rows), device) if rows else []
        for layer, cache in enumerate(caches):
            for b, row in enumerate(rows):
                source = row.caches[layer]
                cache.k[b, :, width - row.length : width] = source.k[row.index, :, row.end - row.length : row.end]
                cache.v[b, :, width - row.length : width] = source.v[row.index, :, row.end - row.length : row.end]
        # as wide as the caches (a slot more than the window), so that the step's view of its first width + 1
        # slots never spans a whole row: a view that did (at the window's end) has another memory layout,
        # which the compiled step would meet in the middle of a reply and compile a new graph for
        n_slots = caches[0].k.shape[2] if caches else 0
        key_mask = right_aligned_mask(torch.tensor(lengths, device=device), width, n_slots)
        self.caches, self.lengths, self.key_mask = caches, lengths, key_mask

    def step(self, tokens: list[int]) -> torch.Tensor:
        """Feeds each row its newest token into slot `width` (after a context shift if the window is full);
        returns every row's next-token logits (B, V)."""
        window = self.model.context_len
        if self.width == window:
            lengths = torch.tensor(self.lengths, device=self.model.device)
            lengths = shift_caches(self.caches, lengths, window, self.shift, self.keep, self.model.rope_cos,
                                   self.model.rope_sin)
            self.lengths = lengths.tolist()
            self.key_mask = right_aligned_mask(lengths, self.width, self.key_mask.shape[1])
        device, width = self.model.device, self.width
        self.key_mask[:, width] = True
        logits = self.model.decode_step(torch.tensor(tokens, device=device),
                                        torch.tensor(self.lengths, device=device),  # a row's next position
                                        torch.tensor([width], device=device), self.key_mask[:, : width + 1],
                                        self.caches)
        self.lengths = [n + 1 for n in self.lengths]
        return logits


def logprob_entries(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> list[TokenLogprob]:
    """logits (N, V) at N places, tokens (N,) the tokens there -> their TokenLogprobs, with `top` alternatives."""
    chosen, best, best_ids = (t.tolist() for t in logprobs_of(logits, tokens, top))
    return [TokenLogprob(token, logprob, list(zip(ids, values)))
            for token, logprob, ids, values in zip(tokens.tolist(), chosen, best_ids, best)]


# ----------------------------------------------------------------------------------------------------------
# The engine


class RowState(enum.Enum):
    DECODING = "decoding"  # in the batch; its next token is fed at the next step
    FINISHED = "finished"  # got its last event: EOS, a stop string or its token budget
    CANCELLED = "cancelled"  # its client went away
    FAILED = "failed"  # something failed for this row alone; it got an error event


@dataclass
class Row:
    """A job being decoded: its text so far, its random stream, and the token to feed at the next step."""
    job: Job
    text: TextStream
    rng_state: torch.Tensor
    state: RowState = RowState.DECODING
    generated: int = 0
    next_token: int = -1
    counts: torch.Tensor | None = None  # (V,) how often each token was generated, for the penalties
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of the tokens generated so far (Sampling.logprobs)
    logprobs_sent: int = 0

    def unsent_logprobs(self) -> list[TokenLogprob]:
        entries, self.logprobs_sent = self.logprobs[self.logprobs_sent :], len(self.logprobs)
        return entries


class EngineState(enum.Enum):
    STARTING = "starting"  # packing the weights
    SERVING = "serving"
    STOPPED = "stopped"  # asked to stop: every job got its last event
    FAILED = "failed"  # could not go on: every job got an error, and new ones are refused


class EngineUnavailable(Exception):
    """A job was submitted to an engine that stopped or failed."""


class QueueFull(Exception):
    """max_waiting jobs wait already."""


class Engine:
    """Owns the model and runs it in one thread: admits waiting jobs (up to max_batch rows), decodes a token
    for every row per step, sends each job its text, drops rows that ended. A failure costs the rows it
    touched and no others; one the engine cannot recover from fails every job and leaves it FAILED (its
    `on_failure` callback tells the server)."""

    def __init__(self, gen: TextGenerator, max_batch: int = 16, max_waiting: int = 256):
        if max_batch < 1 or max_waiting < 0:
            raise ValueError(f"max_batch must be >= 1 and max_waiting >= 0, got {max_batch} and {max_waiting}")
        self.gen = gen
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self.batch = DecodeBatch(gen.model, gen.context_shift, gen.context_keep)
        self.rows: list[Row] = []
        self._waiting: collections.deque[Job] = collections.deque()  # in arrival order
        self._stop_asked = threading.Event()
        self.state = EngineState.STARTING
        self.failure: Failure | None = None  # why it FAILED
        self.on_failure: Callable[[], None] = lambda: None
        self.counts = {state.value: 0 for state in RowState if state is not RowState.DECODING}
        # guards the waiting line and the state: a job is queued only while the engine accepts jobs
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)  # a job was queued, or a stop asked for
        # k_model.sample draws from torch's default generator of the model's device
        if gen.device.type == "cuda":
            self._get_rng = lambda: torch.cuda.get_rng_state(gen.device)
            self._set_rng = lambda state: torch.cuda.set_rng_state(state, gen.device)
        else:
            self._get_rng, self._set_rng = torch.get_rng_state, torch.set_rng_state
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    # -- the server's side ------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Ends every running and waiting job with SHUTTING_DOWN (at the next step), then the thread."""
        with self._arrived:
            self._stop_asked.set()
            self._arrived.notify()
        self._thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        with self._arrived:
            if self.state in (EngineState.STOPPED, EngineState.FAILED):
                raise EngineUnavailable(self.failure.message if self.failure else SHUTTING_DOWN.message)
            if self.waiting() >= self.max_waiting:
                raise QueueFull(f"{self.max_waiting} requests are waiting already")
            self._waiting.append(job)
            self._arrived.notify()

    def waiting(self) -> int:
        """Jobs waiting for a row whose clients are still there: one that hung up holds no place, though it
        leaves the line only at the engine's next step."""
        return sum(not job.cancelled for job in list(self._waiting))

    def stats(self) -> dict[str, int | str]:
        return {"state": self.state.value, "running": len(self.rows), "waiting": self.waiting(),
                "max_batch": self.max_batch, "max_waiting": self.max_waiting, **self.counts}

    # -- the engine thread ------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            # the weights never change while serving: their packed copies for decode steps are made once
            with torch.inference_mode(), self.gen.model.packed_weights():
                self.state = EngineState.SERVING
                while not self._stop_asked.is_set():
                    self._admit()
                    self._decode()
        except Exception as e:  # noqa: BLE001 - whatever it was, no job may be left waiting
            log.exception("the engine failed")
            self.failure = Failure(f"the engine failed: {Failure.of(e).message}", 503)
            self._close(EngineState.FAILED, self.failure)
            self.on_failure()
            return
        self._close(EngineState.STOPPED, SHUTTING_DOWN)

    def _close(self, state: EngineState, failure: Failure) -> None:
        """Ends every row and waiting job with `failure`; from then on submit refuses."""
        with self._lock:
            self.state = state
            for row in self.rows:
                row.job.fail(failure, row.generated)
            self.rows = []
            while self._waiting:
                self._waiting.popleft().fail(failure)

    def _admit(self) -> None:
        """Moves waiting jobs into the batch while there is room; blocks while there is nothing to decode."""
        joining: list[tuple[Row, Prefilled]] = []
        with self._lock:  # also while the batch is full: hung-up clients must not pile up in the line
            self._drop_cancelled()
        while len(self.rows) + len(joining) < self.max_batch:
            job = self._next_job(block=not (self.rows or joining))
            if job is None:
                break
            if admitted := self._prefill(job):
                joining.append(admitted)
        if not joining:
            return
        try:
            self.batch.regroup(list(range(len(self.rows))), [prefilled for _, prefilled in joining])
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: the batch is unchanged, the joining rows fail
            log.exception("growing the batch failed")
            for row, _ in joining:
                self._end(row, RowState.FAILED, failure=Failure.of(e))
            return
        self.rows += [row for row, _ in joining]

    def _next_job(self, block: bool) -> Job | None:
        """The first waiting job whose client is still there, or None: none waits (after waiting for one if
        `block`), or a stop is asked for."""
        with self._arrived:
            while block and not self._waiting and not self._stop_asked.is_set():
                self._arrived.wait()
            self._drop_cancelled()
            return None if self._stop_asked.is_set() or not self._waiting else self._waiting.popleft()

    def _drop_cancelled(self) -> None:
        """Jobs whose clients hung up while they waited leave the line (call with the lock held)."""
        live = [job for job in self._waiting if not job.cancelled]
        self.counts[RowState.CANCELLED.value] += len(self._waiting) - len(live)
        self._waiting = collections.deque(live)

    def _prefill(self, job: Job) -> tuple[Row, Prefilled] | None:
        """The job's prompt run alone (and scored, for an echo with logprobs) and its first token drawn; None if
        it failed or already ended."""
        decode = self.gen.decode if job.sampling.skip_special_tokens else self.gen.reply_text
        row = Row(job, TextStream(decode, job.sampling.stop), self._seeded_state(job.sampling.seed))
        try:
            if job.score_from is not None and job.sampling.logprobs is not None:
                job.emit(Event("", logprobs=self.batch.score(job.prompt, job.sampling.logprobs)[job.score_from :]))
            logits, prefilled = self.batch.prefill(job.prompt)
        except Exception as e:  # noqa: BLE001 - this request alone fails
            log.exception("prefill failed")
            self._end(row, RowState.FAILED, failure=Failure.of(e))
            return None
        self._advance(row, logits)
        return (row, prefilled) if row.state is RowState.DECODING else None

    def _decode(self) -> None:
        """One step for every row: drops the cancelled rows first, then those that ended at this step."""
        for row in self.rows:
            if row.job.cancelled:
                self._end(row, RowState.CANCELLED)
        self._drop_ended()
        if not self.rows:
            return
        try:
            logits = self.batch.step([row.next_token for row in self.rows])
        except Exception as e:  # noqa: BLE001 - the step is shared: every row in it fails, the engine goes on
            log.exception("decode step failed")
            for row in self.rows:
                self._end(row, RowState.FAILED, failure=Failure.of(e))
        else:
            for b, row in enumerate(self.rows):
                self._advance(row, logits[b])
        self._drop_ended()

    def _drop_ended(self) -> None:
        keep = [b for b, row in enumerate(self.rows) if row.state is RowState.DECODING]
        if len(keep) < len(self.rows):
            self.batch.regroup(keep, [])  # smaller than the batch it replaces
            self.rows = [self.rows[b] for b in keep]

    def _advance(self, row: Row, logits: torch.Tensor) -> None:
        """Draws the row's next token from its logits (V,) and sends the text, or ends the row."""
        s = row.job.sampling
        try:
            token = self._draw(row, logits)
            if s.logprobs is not None:
                entry = logprob_entries(logits[None], torch.tensor([token], device=logits.device), s.logprobs)[0]
        except Exception as e:  # noqa: BLE001 - this row alone fails
            log.exception("sampling failed")
            return self._end(row, RowState.FAILED, failure=Failure.of(e))
        row.generated += 1
        if s.logprobs is not None:
            row.logprobs.append(entry)
        if token == self.gen.eos_id and not s.ignore_eos:
            return self._end(row, RowState.FINISHED, row.text.flush(), "stop")
        piece, stopped = row.text.push(token)
        if stopped:
            del row.logprobs[row.text.tokens_sent() :]  # the tokens of the stop string and after it
            return self._end(row, RowState.FINISHED, piece, "stop")
        if row.generated >= s.max_tokens:
            return self._end(row, RowState.FINISHED, piece + row.text.flush(), "length")
        if piece:
            row.job.emit(Event(piece, logprobs=row.unsent_logprobs()))
        row.next_token = token

    def _end(self, row: Row, state: RowState, piece: str = "", reason: str = "error",
             failure: Failure | None = None) -> None:
        """The row's last event (none for a cancelled row: nobody reads it); it leaves at the next regroup."""
        row.state = state
        self.counts[state.value] += 1
        if state is RowState.FINISHED:
            row.job.emit(Event(piece, reason, row.generated, logprobs=row.unsent_logprobs()))
        elif state is RowState.FAILED:
            row.job.fail(failure or Failure("unknown failure"), row.generated)

    def _draw(self, row: Row, logits: torch.Tensor) -> int:
        """Greedy, or one draw from the row's own random stream: k_model.sample draws from the default
        generator, so the row's state is swapped in for the draw (and the default's put back after, also
        when the draw fails). A seeded request thus gets the tokens it gets alone after
        torch.manual_seed(seed), whoever shares its batch. Penalties, if any, apply before either."""
        s = row.job.sampling
        if s.penalized:
            if row.counts is None:
                row.counts = torch.zeros(logits.shape[-1], device=logits.device)
            logits = penalize(logits, row.counts, s.presence_penalty, s.frequency_penalty)
        if s.greedy:
            token = int(logits.argmax())
        else:
            saved = self._get_rng()
            self._set_rng(row.rng_state)
            try:
                token = int(sample(logits[None], s.temperature, s.top_k, s.top_p)[0])
                row.rng_state = self._get_rng()
            finally:
                self._set_rng(saved)
        if row.counts is not None:
            row.counts[token] += 1
        return token

    def _seeded_state(self, seed: int | None) -> torch.Tensor:
        rng = torch.Generator(self.gen.device)
        if seed is None:
            rng.seed()  # a fresh random seed
        else:
            rng.manual_seed(seed)
        return rng.get_state()
