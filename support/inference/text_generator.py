"""TextGenerator: a trained model and its tokenizer, ready to generate text, answer chats, score perplexity and
classify. The inference layer's front: model_sample.py, serve.py (through the generation engine) and
data_process.py (preference pairs) build on it.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from dataset import PretrainDataset, chat_prompt_ids, document_start_ids
from k_model import Transformer
from support.loading.sources import open_model, resolve_device, resolve_dtype
from support.model.context_shift import resolve_shift
from support.inference.tool_calls import reply_text


# A Llama 3.x base has 131,072 positions: a KV cache that long takes ~8.6 GB per row for the 1B model in
# float32, so inference uses at most this window unless asked (--context_len)
DEFAULT_CONTEXT_LEN = 8192


class TextGenerator:
    """A trained model and its tokenizer, ready to generate (loading.open_model: any model source; a
    vocabulary mismatch raises ValueError naming both files). Generation goes on past the context window
    by the context shift (context_shift.py): `context_shift` tokens dropped at a time (None: half the window),
    the first `context_keep` tokens always kept; a shift that does not fit the window raises ValueError.
    The window is the model's max_seq_len, at most `context_len` tokens (0: no limit)."""

    def __init__(self, model_path: str | Path, tokenizer_path: str | None = None, device: str = "auto",
                 dtype: str = "auto", context_shift: int | None = None, context_keep: int = 0,
                 context_len: int = DEFAULT_CONTEXT_LEN):
        self.device = resolve_device(device)
        model, self.tokenizer, self.info = open_model(model_path, tokenizer_path)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model: Transformer = model.to(device=self.device, dtype=self.dtype).eval()
        self.eos_id = self.tokenizer.eos_token_id
        if context_len < 0:
            raise ValueError(f"--context_len {context_len}: must be >= 0 (0: the model's {model.config.max_seq_len})")
        self.model.context_limit = context_len or None
        self.context_keep = context_keep
        try:
            self.context_shift = resolve_shift(self.context_len, context_shift, context_keep)
        except ValueError as e:
            raise ValueError(f"--context_shift / --context_keep: {e}") from None
        self._shifting = dict(shift=self.context_shift, keep=context_keep)

    @property
    def context_len(self) -> int:
        return self.model.context_len

    def encode(self, text: str) -> list[int]:
        """Plain text to ids; a "<|im_end|>" typed in it stays text, as in pretraining documents."""
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def reply_text(self, ids: Iterable[int]) -> str:
        """A reply's text with the chat markers it wrote (tool_calls.reply_text)."""
        return reply_text(self.tokenizer, ids)

    def compile_decode(self, max_batch: int = 1) -> None:
        """Compiles the model's one-token step (k_model.compile_decode) now, every graph that batches of up to
        max_batch rows need (CompiledStep.batches_to_trace), instead of in the middle of a reply; a larger
        batch is then refused rather than compiled (CompiledStep.max_batch)."""
        self.model.compile_decode()
        step = self.model._compiled_step
        if step is None:  # torch.compile refused: eager decoding takes any batch
            return
        for rows in step.batches_to_trace(max_batch):
            self.model.generate(self._tensor([self.eos_id], rows), 2, temperature=0.0)
        step.max_batch = max_batch  # where the first step failed to compile, the model decodes eagerly anyway

    def _tensor(self, ids: list[int], rows: int = 1) -> torch.Tensor:
        return torch.tensor([ids] * rows, dtype=torch.long, device=self.device)

    # -- pretrained model: continue text ----------------------------------------------------------------------

    def document_ids(self, start: str) -> list[int]:
        """The ids a pretrained model continues `start` from (dataset.document_start_ids; serve.py's
        /v1/completions uses it too)."""
        return document_start_ids(self.tokenizer, start)

    def pretrain_sample(self, start: str = "", num_samples: int = 1, max_new_tokens: int = 128,
                        temperature: float = 0.7, top_k: int | None = None, top_p: float | None = None) -> list[str]:
        """num_samples continuations of `start` (each returned with `start` in front); a sample ends at EOS."""
        new = self.model.generate(self._tensor(self.document_ids(start), num_samples), max_new_tokens,
                                  temperature, top_k, top_p, stop_id=self.eos_id, **self._shifting)
        return [start + self.decode(row) for row in new.tolist()]

    def pretrain_stream(self, start: str = "", max_new_tokens: int = 128, temperature: float = 0.7,
                        top_k: int | None = None, top_p: float | None = None) -> Iterator[str]:
        """One continuation of `start`, yielded as text pieces while it is generated (start not included)."""
        ids = self.model.stream_generate(self._tensor(self.document_ids(start)), max_new_tokens, temperature,
                                         top_k, top_p, stop_id=self.eos_id, **self._shifting)
        yield from self._text_pieces(ids)

    # -- SFT model: chat template ----------------------------------------------------------------------------

    def chat_ids(self, messages: list[dict], tools: list[dict] | None = None,
                 enable_thinking: bool | None = None) -> list[int]:
        """The conversation (and the OpenAI function schemas of `tools`) in the chat template, ending with the
        assistant's generation prompt (enable_thinking=False: and an empty think block). Only the template's
        markers are control tokens: a turn forged inside a message stays text (dataset.encode_chat)."""
        return chat_prompt_ids(self.tokenizer, messages, tools, enable_thinking)

    def sft_sample(self, prompt: str, system_prompt: str | None = None, history: list[dict[str, str]] | None = None,
                   max_new_tokens: int = 128, temperature: float = 0.7, top_k: int | None = None,
                   top_p: float | None = None) -> str:
        """The assistant's reply to `prompt` after the optional system prompt and earlier turns."""
        ids = self.chat_ids(build_messages(prompt, system_prompt, history))
        new = self.model.generate(self._tensor(ids), max_new_tokens, temperature, top_k, top_p, stop_id=self.eos_id,
                                  **self._shifting)
        return self.decode(new[0].tolist())

    def sft_stream(self, messages: list[dict[str, str]], max_new_tokens: int = 128, temperature: float = 0.7,
                   top_k: int | None = None, top_p: float | None = None) -> Iterator[str]:
        ids = self.model.stream_generate(self._tensor(self.chat_ids(messages)), max_new_tokens, temperature,
                                         top_k, top_p, stop_id=self.eos_id, **self._shifting)
        yield from self._text_pieces(ids)

    def _text_pieces(self, ids: Iterable[int]) -> Iterator[str]:
        """Decoded text as tokens arrive. A Chinese character spans several byte-level tokens, so a piece is
        only released once the text decoded so far no longer ends in an incomplete character."""
        tokens: list[int] = []
        shown = 0
        for tok in ids:
            tokens.append(tok)
            text = self.decode(tokens)
            if not text.endswith("\ufffd"):
                yield text[shown:]
                shown = len(text)
        text = self.decode(tokens)
        if len(text) > shown:
            yield text[shown:]

    def trim_history(self, messages: list[dict[str, str]], max_new_tokens: int) -> list[dict[str, str]]:
        """Drop the oldest turns (keeping a leading system prompt and the last user message) until the prompt
        and the reply fit the context window. The reply is given up to half of the window; a longer one goes on
        past it by the context shift, which drops the conversation's oldest tokens."""
        budget = self.context_len - min(max_new_tokens, self.context_len // 2)
        system = messages[:1] if messages and messages[0]["role"] == "system" else []
        turns = messages[len(system):]
        # where the kept turns start after each drop: a user turn goes with the answer after it
        starts = [0]
        while len(turns) - starts[-1] > 1:
            first = starts[-1]
            starts.append(first + (2 if turns[first]["role"] == "user" and len(turns) - first > 2 else 1))
        # the prompt only shrinks as turns go, so a binary search finds the first start that fits: a few
        # tokenizations of the conversation instead of one per dropped turn (1,002 messages: 0.95 s, not 139 s)
        lo, hi = 0, len(starts) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if len(self.chat_ids(system + turns[starts[mid]:])) <= budget:
                hi = mid
            else:
                lo = mid + 1
        return system + turns[starts[lo]:]

    # -- evaluation --------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def perplexity(self, data_path: str, batch_size: int = 32) -> tuple[float, int]:
        """exp of the mean next-token loss over every full window of the pretokenized file (windows as
        long as the model's context, as in training); returns (perplexity, tokens scored)."""
        data = PretrainDataset(data_path, self.tokenizer, max_length=self.context_len)
        loss_sum, count = 0.0, 0
        for i in range(0, len(data), batch_size):
            items = [data[j] for j in range(i, min(i + batch_size, len(data)))]
            x, y = (torch.stack(t).to(self.device) for t in list(zip(*items))[:2])
            loss_sum += self.model(x, y).last_loss.double().sum().item()
            count += y.numel()
        return math.exp(loss_sum / count), count

    @torch.inference_mode()
    def replies(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                batch_size: int = 64) -> list[list[int]]:
        """Each prompt's reply ids (the closing EOS left out), generated for many prompts at once: prompts of
        similar length are batched together, left-padded, with an attention mask (each row gets exactly what
        it would get alone)."""
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        replies: list[list[int]] = [[] for _ in prompts]
        pad, eos = self.tokenizer.pad_token_id, self.eos_id
        for b in tqdm(range(0, len(order), batch_size), desc="replies", unit="batch", disable=None, leave=False):
            rows = [prompts[i] for i in order[b : b + batch_size]]
            width = max(map(len, rows))
            idx = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self.device)
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
            new = self.model.generate(idx, max_new_tokens, temperature, stop_id=eos, attention_mask=mask,
                                      **self._shifting)
            for i, row in zip(order[b : b + batch_size], new.tolist()):
                replies[i] = row[: row.index(eos)] if eos in row else row
        return replies

    def classify(self, conversations: list[list[dict[str, str]]], labels: list[str],
                 batch_size: int = 64) -> list[str]:
        """Greedy replies (at most as long as the longest label) to many prompts at once (replies)."""
        max_new = max(len(self.encode(label)) for label in labels) + 1  # + the closing EOS
        prompts = [self.chat_ids(c)[-self.context_len:] for c in conversations]
        return [self.decode(ids).strip() for ids in self.replies(prompts, max_new, batch_size=batch_size)]


def build_messages(prompt: str, system_prompt: str | None = None,
                   history: list[dict[str, str]] | None = None) -> list[dict[str, str]]:
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return system + list(history or []) + [{"role": "user", "content": prompt}]
