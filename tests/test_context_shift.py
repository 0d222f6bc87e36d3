"""Generation past the context window by the context shift (support/model/context_shift.py), against references
written out here and computed by transformers' LlamaForCausalLM without a cache:

  * the rule: when the longest row fills the window, every row keeps its first `keep` tokens and its newest
    ones, at most window - shift in all (Kept below);
  * "fresh": the logits of a shifted cache = LlamaForCausalLM run on the kept tokens alone, at positions 0..
    Exact for a 1-layer model (its keys and values come from the embeddings alone); in deeper layers a kept
    entry still carries what attention took from the dropped tokens, which a fresh run cannot see;
  * "masked": for any depth, with keep = 0: LlamaForCausalLM on the whole sequence at its original positions,
    each token attending only to what was in the cache when it was fed (RoPE depends on distances only);
  * "fed": LlamaForCausalLM fed the kept tokens one at a time with its KV cache, as its generate feeds them.
    Exact for a 1-layer model, and for dynamic NTK RoPE too, whose angles depend on more than the distance.
"""
from __future__ import annotations

import openai
import pytest
import torch
from transformers import DynamicCache
from test_model import VOCAB, left_pad, tiny
from test_serve import client_for, live

from k_model import Transformer
import model_sample
import serve
from support.inference.text_generator import TextGenerator
from serve import create_app
from support.model.context_shift import shift_caches
from support.inference.generation_engine import DecodeBatch
from support.model.hf_llama import export_hf, to_hf_llama

WINDOW = 16


class Kept:
    """The reference's bookkeeping for one batch: per row, its whole sequence, the indices of the tokens in the
    cache, and for every fed token the indices it could attend to (itself included)."""

    def __init__(self, prompts: list[list[int]], window: int, shift: int, keep: int):
        self.window, self.shift, self.keep = window, shift, keep
        self.seqs = [list(p[-window:]) for p in prompts]  # a prompt longer than the window keeps its last tokens
        self.cached = [list(range(len(s))) for s in self.seqs]
        self.sees = [[list(range(i + 1)) for i in range(len(s))] for s in self.seqs]

    def feed(self, tokens: list[int]) -> None:
        if max(map(len, self.cached)) == self.window:  # the longest row filled the window: shift
            for b, cached in enumerate(self.cached):
                total = min(len(cached), self.window - self.shift)
                head = cached[: min(self.keep, total)]
                self.cached[b] = head + cached[len(cached) - (total - len(head)):]
        for b, tok in enumerate(tokens):
            self.seqs[b].append(tok)
            self.cached[b].append(len(self.seqs[b]) - 1)
            self.sees[b].append(list(self.cached[b]))

    def fresh(self, hf, b: int) -> torch.Tensor:
        """Next-token logits of row b: LlamaForCausalLM on its cached tokens alone."""
        ids = torch.tensor([[self.seqs[b][i] for i in self.cached[b]]])
        return hf(ids).logits[0, -1]

    def masked(self, hf, b: int) -> torch.Tensor:
        """Next-token logits of row b: LlamaForCausalLM on its whole sequence, each token seeing what it saw."""
        n = len(self.seqs[b])
        allowed = torch.zeros(n, n, dtype=torch.bool)
        for i, seen in enumerate(self.sees[b]):
            allowed[i, seen] = True
        mask = torch.zeros(1, 1, n, n).masked_fill(~allowed, torch.finfo(torch.float32).min)
        return hf(torch.tensor([self.seqs[b]]), attention_mask=mask).logits[0, -1]


    def fed(self, hf, b: int) -> torch.Tensor:
        """Next-token logits of row b: LlamaForCausalLM fed its cached tokens one at a time, from position 0."""
        cache = DynamicCache(config=hf.config)
        for i in self.cached[b]:
            logits = hf(torch.tensor([[self.seqs[b][i]]]), cache=cache, use_cache=True).logits
        return logits[0, -1]


def batch(lengths: list[int], seed: int = 0) -> tuple[list[list[int]], torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    prompts = [torch.randint(1, VOCAB, (n,)) for n in lengths]
    idx, mask = left_pad(prompts)
    return [p.tolist() for p in prompts], idx, mask


def cached_logits(model: Transformer, idx, mask, feed: torch.Tensor, shift: int, keep: int) -> list[torch.Tensor]:
    """Next-token logits (B, V) after the prompt and after each fed column of feed (B, n), through the
    step-wise API: prefill, decode_step, and context_shift.shift_caches whenever the window is full."""
    window = model.config.max_seq_len
    caches = model.new_caches(idx.shape[0], idx.device)
    logits, pos, _ = model.prefill(idx, mask.bool(), caches)
    out, filled = [logits], idx.shape[1]
    for tok in feed.T:
        if filled == window:
            pos = shift_caches(caches, pos, filled, shift, keep, model.rope_cos, model.rope_sin)
            filled -= shift
        slots = torch.arange(filled + 1)
        attend = (slots >= filled - pos[:, None]) & (slots <= filled)  # each row's tokens, right-aligned
        out.append(model.decode_step(tok, pos, torch.tensor([filled]), attend, caches))
        pos, filled = pos + 1, filled + 1
    return out


def engine_logits(model: Transformer, prompts: list[list[int]], feed: torch.Tensor, shift: int,
                  keep: int) -> list[torch.Tensor]:
    """The same through serve.py's engine: each prompt prefilled alone, the rows laid side by side."""
    rows = DecodeBatch(model, shift, keep)
    prefilled = [rows.prefill(p) for p in prompts]
    rows.regroup([], [p for _, p in prefilled])
    return [torch.stack([logits for logits, _ in prefilled])] + [rows.step(tok.tolist()) for tok in feed.T]


def assert_steps_follow(steps, hf, kept: Kept, feed: torch.Tensor, reference: str) -> None:
    """Every step's logits equal LlamaForCausalLM's `reference` (a Kept method: what each row's cache holds),
    the fed tokens joining the bookkeeping after each step."""
    for step, logits in enumerate(steps):
        for b in range(len(kept.seqs)):
            ref = getattr(kept, reference)(hf, b)
            torch.testing.assert_close(logits[b], ref, rtol=1e-4, atol=1e-4, msg=f"step {step}, row {b}")
        if step < feed.shape[1]:
            kept.feed(feed[:, step].tolist())


@pytest.mark.parametrize("layers, keep, reference", [(1, 3, "fresh"), (2, 0, "masked")])
@pytest.mark.parametrize("driver", ["generate's", "serve's engine"])
def test_logits_after_shifts_equal_transformers_on_what_the_cache_holds(layers, keep, reference, driver):
    """A batch of 5 and 13 prompt tokens (left-padded, or right-aligned by the engine), window 16, fed 30
    tokens: several shifts, the short row dropping fewer tokens than the long one. Every step's logits equal
    LlamaForCausalLM's reference."""
    model = tiny(n_layers=layers, max_seq_len=WINDOW)
    hf = to_hf_llama(model).eval()
    prompts, idx, mask = batch([5, 13])
    feed = torch.randint(0, VOCAB, (2, 30))
    kept = Kept(prompts, WINDOW, shift=5, keep=keep)
    with torch.no_grad():
        steps = (cached_logits(model, idx, mask, feed, shift=5, keep=keep) if driver == "generate's"
                 else engine_logits(model, prompts, feed, shift=5, keep=keep))
        assert_steps_follow(steps, hf, kept, feed, reference)
    assert kept.cached[0][:keep] == list(range(keep))  # the kept first tokens are still there
    assert len(kept.seqs[1]) > 2 * WINDOW  # the long row went far past the window


def greedy_reference(model: Transformer, prompts: list[list[int]], n: int, shift: int, keep: int,
                     reference: str) -> list[list[int]]:
    hf = to_hf_llama(model).eval()
    kept = Kept(prompts, model.context_len, shift, keep)
    with torch.no_grad():
        for _ in range(n):
            kept.feed([int(getattr(kept, reference)(hf, b).argmax()) for b in range(len(prompts))])
    return [seq[len(seq) - n:] for seq in kept.seqs]


def test_generate_past_the_window_prefills_once_and_equals_the_reference(monkeypatch):
    """generate and stream_generate past the window: as many tokens as asked, the tokens of the reference loop,
    and the prompt is the only prefill (before, every token past the window re-prefilled the window)."""
    model = tiny(n_layers=2, max_seq_len=WINDOW)
    prompts, idx, mask = batch([4, 11, 9], seed=1)
    prefills = []
    real = model.prefill
    monkeypatch.setattr(model, "prefill", lambda *a: prefills.append(a[0].shape) or real(*a))
    out = model.generate(idx, 40, temperature=0, attention_mask=mask, shift=6)
    assert out.tolist() == greedy_reference(model, prompts, 40, shift=6, keep=0, reference="masked")
    assert len(prefills) == 1
    single = tiny(n_layers=1, max_seq_len=WINDOW)  # keep > 0: the "fresh" reference, exact for one layer
    one = single.generate(idx[1:2], 25, temperature=0, keep=2)  # default shift: (16 - 2) // 2 = 7
    assert one.tolist() == greedy_reference(single, prompts[1:2], 25, shift=7, keep=2, reference="fresh")
    assert list(single.stream_generate(idx[1:2], 25, temperature=0, keep=2)) == one[0].tolist()


def test_a_context_limit_below_max_seq_len_is_the_window():
    """context_limit (TextGenerator's --context_len) makes a 64-position model decode in a 16-token window:
    its caches hold 16 tokens and the context shifts there, as the reference with a 16-token window says."""
    model = tiny(n_layers=2, max_seq_len=64)
    model.context_limit = WINDOW
    prompts, idx, mask = batch([4, 11], seed=4)
    out = model.generate(idx, 40, temperature=0, attention_mask=mask, shift=6)
    assert out.tolist() == greedy_reference(model, prompts, 40, shift=6, keep=0, reference="masked")
    assert model.new_caches(1, idx.device)[0].k.shape[2] == WINDOW + 1


def test_prompt_longer_than_the_window_keeps_its_last_tokens_then_shifts():
    model = tiny(n_layers=1, max_seq_len=WINDOW)
    prompts, idx, _ = batch([40], seed=2)
    out = model.generate(idx, 20, temperature=0, shift=4, keep=1)
    assert out.tolist() == greedy_reference(model, prompts, 20, shift=4, keep=1, reference="fresh")


def test_compiled_step_shifts_without_a_recompile():
    """The compiled step after shifts: the reference's tokens, and no graph compiled again (the caches are
    moved in place)."""
    model = tiny(n_layers=1, max_seq_len=WINDOW)
    prompts, idx, mask = batch([3, 12], seed=3)
    model.compile_decode()
    model.generate(idx[:, -1:], 2, temperature=0)  # compiles the batch > 1 graph
    with torch._dynamo.config.patch(error_on_recompile=True):
        out = model.generate(idx, 30, temperature=0, attention_mask=mask, shift=5, keep=2)
    assert out.tolist() == greedy_reference(model, prompts, 30, shift=5, keep=2, reference="fresh")


def test_dynamic_rope_keys_move_to_the_angle_decoding_gives_their_new_position():
    """Under dynamic NTK scaling the frequencies grow with the sequence (transformers' generate rotates token p
    with those of p + 1 tokens, once past the original context of 8 here), so a moved key is not turned back
    by the distance it moved but to the angle decoding gives its new position: every step's logits equal
    LlamaForCausalLM fed the kept tokens one at a time (prompts within the original context prefill alike)."""
    dynamic = {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": WINDOW // 2}
    model = tiny(n_layers=1, max_seq_len=WINDOW, rope_scaling_params=dynamic, rope_theta=500.0)
    hf = to_hf_llama(model).eval()
    prompts, idx, mask = batch([5, 8])
    feed = torch.randint(0, VOCAB, (2, 20))
    kept = Kept(prompts, WINDOW, shift=5, keep=3)
    with torch.no_grad():
        assert_steps_follow(cached_logits(model, idx, mask, feed, shift=5, keep=3), hf, kept, feed, "fed")


@pytest.mark.parametrize("shift, keep", [(0, 0), (16, 0), (10, 6), (3, -1)])
def test_a_shift_that_does_not_fit_the_window_is_refused(shift, keep):
    model = tiny(n_layers=1, max_seq_len=WINDOW)
    with pytest.raises(ValueError, match=f"context shift {shift} with {keep} kept tokens"):
        model.generate(torch.ones(1, 3, dtype=torch.long), 4, shift=shift, keep=keep)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer) -> str:
    """A 2-layer model with a 32-token context, exported with the tiny tokenizer."""
    path = tmp_path_factory.mktemp("shift_model")
    export_hf(tiny(n_layers=2, max_seq_len=32, vocab_size=len(tiny_tokenizer)), path)
    tiny_tokenizer.save_pretrained(path)
    return str(path)


def test_serve_answers_more_tokens_than_the_window_holds(model_dir):
    """A 32-token context; the openai client asks for 100 tokens after a prompt of ~20: it gets all 100,
    the tokens model.generate gives the same prompt alone (the engine shifts as generate does)."""
    gen = TextGenerator(model_dir, device="cpu", dtype="float32", context_shift=10, context_keep=4)
    messages = [{"role": "user", "content": "你好"}]
    ids = torch.tensor([gen.chat_ids(messages)])
    assert 4 < ids.shape[1] < 32
    expected = gen.model.generate(ids, 100, temperature=0, shift=10, keep=4)[0].tolist()
    with live(create_app(gen, "tiny")) as base:
        r = client_for(base).chat.completions.create(model="tiny", messages=messages, max_tokens=100,
                                                     temperature=0, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 100
    assert r.choices[0].message.content == gen.decode(expected)


def test_context_len_caps_the_generators_window(model_dir):
    """--context_len: the window is the model's 32 tokens, at most context_len; 0 lifts the cap; the server
    reports and uses the capped window."""
    assert TextGenerator(model_dir, device="cpu", context_len=0).context_len == 32
    assert TextGenerator(model_dir, device="cpu", context_len=100).context_len == 32
    gen = TextGenerator(model_dir, device="cpu", dtype="float32", context_len=20)
    assert gen.context_len == 20 == gen.model.context_len
    prompt = next(p for p in ("好" * n for n in range(1, 40)) if 20 <= len(gen.encode(p)) < 32)
    with live(create_app(gen, "tiny")) as base:
        assert client_for(base).models.retrieve("tiny").context_length == 20
        with pytest.raises(openai.BadRequestError, match=r"the model's context is 20 tokens"):
            client_for(base).completions.create(model="tiny", prompt=prompt, max_tokens=4)
    with pytest.raises(ValueError, match=r"--context_len -1: must be >= 0"):
        TextGenerator(model_dir, device="cpu", context_len=-1)


@pytest.mark.parametrize("script", [model_sample, serve])
def test_a_bad_context_shift_flag_is_one_error_line(model_dir, script, capsys):
    argv = ["--sft_path" if script is model_sample else "--model", model_dir, "--context_shift", "30",
            "--context_keep", "2"]
    with pytest.raises(SystemExit, match=r"^error: --context_shift / --context_keep: context shift 30 with 2 kept "
                                         r"tokens does not fit a window of 32"):
        script.main(argv)
