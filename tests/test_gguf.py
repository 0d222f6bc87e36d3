"""export_gguf.py, checked by llama.cpp itself: the xllamacpp wheel (a CPU build of llama.cpp's server, a
test-only dependency) loads each exported file in-process, and its tokens, log-probs, tokenizer and chat
endpoint are compared with our model's (and, for a LoRA adapter, with peft's on transformers' Llama)."""
from __future__ import annotations

import contextlib
import gc
import json
import urllib.request
from pathlib import Path

import pytest
import torch

xllamacpp = pytest.importorskip("xllamacpp")

import export_gguf  # noqa: E402
from k_model import ModelConfig, Transformer  # noqa: E402
from support.model.hf_llama import export_hf  # noqa: E402

PROMPTS = ["人民日报社论：新年", "The weather today is", "x = 42\nprint(x)"]
MIXED = ("中文，全角标点！「引号」。？ English words, don't stop; digits 12345 3.14159 ２０２６ "
         "emoji 🙂👍🏽🇨🇳 code: def f(x):\n    return x ** 2  # 注释\n\n\n   runs   of spaces\t\ttabs  ")


def tiny_model(vocab: int, seed: int = 0, **cfg) -> Transformer:
    """A random model whose logits are far from uniform (weights 3x the usual init), so that greedy choices
    are clear and a wrong layout cannot pass by luck. Untied unless asked: a random tied model mostly
    predicts its input token again, which makes generations degenerate."""
    torch.manual_seed(seed)
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab, max_seq_len=256,
                tie_word_embeddings=False)
    model = Transformer(ModelConfig(**{**base, **cfg})).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    return model


def save_model(model: Transformer, tokenizer, path: Path) -> Path:
    """An HF export directory (model + tokenizer), the way training runs leave hf/."""
    export_hf(model, path)
    tokenizer.save_pretrained(path)
    return path


def export(model_dir: Path, outtype: str) -> Path:
    out = model_dir.parent / f"{model_dir.name}-{outtype}.gguf"
    export_gguf.main(["--model", str(model_dir), "--outfile", str(out), "--outtype", outtype])
    return out


class Llama:
    """llama.cpp's server on an exported file (in this process; its HTTP API on a free local port)."""

    def __init__(self, path: Path, ascii_id: int, n_ctx: int = 128):
        self.ascii_id = ascii_id  # a token that is one whole character ("a")
        params = xllamacpp.CommonParams()
        params.model.path = str(path)
        params.n_ctx = n_ctx
        params.n_parallel = 1
        params.cpuparams.n_threads = params.cpuparams_batch.n_threads = 1
        params.warmup = False
        # keys and values cached in float32 (llama.cpp's default is f16), so that an f32 file computes in f32
        params.cache_type_k = params.cache_type_v = xllamacpp.ggml_type.GGML_TYPE_F32
        params.flash_attn_type = xllamacpp.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.server = xllamacpp.Server(params)
        self.url = self.server.listening_address

    def post(self, route: str, body: dict) -> dict:
        req = urllib.request.Request(self.url + route, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())

    def greedy(self, ids: list[int], n: int) -> list[int]:
        return self.post("/completion", {"prompt": ids, "n_predict": n, "temperature": 0,
                                         "return_tokens": True})["tokens"]

    def top(self, ids: list[int], k: int = 5) -> list[tuple[int, float]]:
        """The k most likely next tokens after ids, with their log-probs from the raw logits. The server
        reports probabilities only with a token that completes a UTF-8 character, so one is forced by a logit
        bias (the reported log-probs are computed before any bias)."""
        r = self.post("/completion", {"prompt": ids, "n_predict": 1, "temperature": 0, "n_probs": k,
                                      "post_sampling_probs": False, "logit_bias": [[self.ascii_id, 1000]]})
        return [(t["id"], t["logprob"]) for t in r["completion_probabilities"][0]["top_logprobs"]]

    def tokenize(self, text: str) -> list[int]:
        return self.post("/tokenize", {"content": text, "add_special": False})["tokens"]


@contextlib.contextmanager
def llama(path: Path, tokenizer, n_ctx: int = 128):
    server = Llama(path, tokenizer.convert_tokens_to_ids("a"), n_ctx)
    try:
        yield server
    finally:
        del server.server
        gc.collect()


def our_logprobs(model: Transformer, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def assert_top_matches(server: Llama, model: Transformer, ids: list[int], positions, atol: float) -> None:
    """At each position, llama.cpp's top-5 next tokens have our log-probs within atol (its first is ours, or
    within atol of ours: a near tie that rounding may order either way)."""
    ours = our_logprobs(model, ids)
    for p in positions:
        theirs = server.top(ids[:p + 1])
        assert ours[p, theirs[0][0]] >= ours[p].max() - atol, f"position {p}: their top token is not ours"
        got = torch.tensor([lp for _, lp in theirs])
        want = ours[p, [i for i, _ in theirs]]
        assert torch.allclose(got, want, atol=atol), f"position {p}: {got} vs {want}"


def test_f32_greedy_and_logprobs_equal_ours(tmp_path, tiny_tokenizer):
    model = tiny_model(len(tiny_tokenizer))
    path = export(save_model(model, tiny_tokenizer, tmp_path / "m"), "f32")
    with llama(path, tiny_tokenizer) as server:
        for prompt in PROMPTS:
            ids = tiny_tokenizer.encode(prompt)
            ours = model.generate(torch.tensor([ids]), 16, temperature=0, stop_id=tiny_tokenizer.eos_token_id)
            ours = ours[0].tolist()
            assert server.greedy(ids, 16) == [t for t in ours if t != tiny_tokenizer.eos_token_id]
            assert_top_matches(server, model, ids + ours, range(len(ids) - 1, len(ids) + len(ours) - 1), 1e-4)


def test_moe_greedy_and_logprobs_equal_ours(tmp_path, tiny_tokenizer):
    """A mixture of experts is written as llama.cpp reads Mixtral (the llama architecture with expert
    tensors): f32 runs as ours does, and q8_0 keeps the router in float32, so its tokens go where ours do."""
    model = tiny_model(len(tiny_tokenizer), num_local_experts=4, num_experts_per_tok=2)
    with torch.no_grad():  # the stacked experts are no matrices for tiny_model's sharpening
        for layer in model.layers:
            layer.feed_forward.w13.mul_(3.0)
            layer.feed_forward.w2.mul_(3.0)
    model_dir = save_model(model, tiny_tokenizer, tmp_path / "m")
    ids = tiny_tokenizer.encode(PROMPTS[0])
    ours = model.generate(torch.tensor([ids]), 16, temperature=0)[0].tolist()
    with llama(export(model_dir, "f32"), tiny_tokenizer) as server:
        assert server.greedy(ids, 16) == ours
        assert_top_matches(server, model, ids + ours, range(len(ids) - 1, len(ids) + len(ours) - 1), 1e-4)
    import gguf

    q8 = export(model_dir, "q8_0")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(q8).tensors}
    assert types["blk.0.ffn_gate_inp.weight"] == gguf.GGMLQuantizationType.F32
    assert types["blk.0.ffn_up_exps.weight"] == gguf.GGMLQuantizationType.Q8_0


def rounded(model: Transformer, dtype: torch.dtype) -> Transformer:
    """Our model with its matrices rounded to dtype as the export stores them (norms stay float32)."""
    copy = Transformer(model.config).eval()
    copy.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in copy.parameters():
            if p.dim() == 2:
                p.copy_(p.to(dtype).float())
    return copy


@pytest.mark.parametrize("outtype, dtype, atol", [("f16", torch.float16, 2e-3), ("bf16", torch.bfloat16, 1e-2)])
def test_f16_bf16_within_rounding(tmp_path, tiny_tokenizer, outtype, dtype, atol):
    """Against our model on the same rounded weights; llama.cpp also rounds activations to the weights' type
    before each product, which the tolerance allows (measured over 200 positions: 9e-4 f16, 6e-3 bf16)."""
    model = tiny_model(len(tiny_tokenizer))
    path = export(save_model(model, tiny_tokenizer, tmp_path / "m"), outtype)
    reference = rounded(model, dtype)
    with llama(path, tiny_tokenizer) as server:
        ids = tiny_tokenizer.encode(PROMPTS[0])
        ours = reference.generate(torch.tensor([ids]), 12, temperature=0)[0].tolist()
        theirs = server.greedy(ids, 12)
        same = next((k for k, (a, b) in enumerate(zip(theirs, ours)) if a != b), len(ours))
        if same < len(ours):  # only a near tie may part the two: both tokens within rounding of the best
            logprobs = our_logprobs(reference, ids + ours)[len(ids) + same - 1]
            assert logprobs[theirs[same]] >= logprobs.max() - atol, f"llama.cpp left our greedy path at {same}"
        assert_top_matches(server, reference, ids + ours, range(len(ids) - 1, len(ids) + len(ours) - 1), atol)


def test_q8_0_agrees_on_teacher_forced_text_and_has_q8_0_size(tmp_path, tiny_tokenizer, tiny_texts):
    model = tiny_model(len(tiny_tokenizer))
    model_dir = save_model(model, tiny_tokenizer, tmp_path / "m")
    q8, f32 = export(model_dir, "q8_0"), export(model_dir, "f32")
    # q8_0: blocks of 32 values as 32 int8 + one f16 scale = 34 bytes per 128 of float32; norms stay float32
    matrices = sum(p.numel() for p in model.parameters() if p.dim() == 2)
    assert f32.stat().st_size - q8.stat().st_size == pytest.approx(matrices * (4 - 34 / 32), abs=4096)
    ids = tiny_tokenizer.encode(" ".join(tiny_texts[:20]))[:201]
    ours = our_logprobs(model, ids).argmax(-1)
    with llama(q8, tiny_tokenizer, n_ctx=256) as server:
        agree = sum(server.top(ids[:p + 1], k=1)[0][0] == int(ours[p]) for p in range(200))
    assert agree >= 190, f"q8_0 top-1 agreement {agree}/200"  # 95%; measured 193 on this random model


def test_tokenizer_equals_ours_on_mixed_text(tmp_path, tiny_tokenizer):
    """Chinese with full-width punctuation, English, digits, emoji, code, runs of spaces, tabs and newlines."""
    path = export(save_model(tiny_model(len(tiny_tokenizer)), tiny_tokenizer, tmp_path / "m"), "f16")
    with llama(path, tiny_tokenizer) as server:
        for text in (MIXED, *PROMPTS, "\n\n", "  a", "a  ", " 🙂 ", "１２３，ＡＢＣ"):
            assert server.tokenize(text) == tiny_tokenizer.encode(text), repr(text)


def test_an_nfkc_tokenizer_exports_with_a_warning(tmp_path, tiny_tokenizer, capsys):
    """A tokenizer trained before NFKC was dropped: exported, with one line saying where llama.cpp differs."""
    from tokenizers import normalizers
    from transformers import AutoTokenizer

    nfkc = AutoTokenizer.from_pretrained(tiny_tokenizer.name_or_path)
    nfkc.backend_tokenizer.normalizer = normalizers.NFKC()
    path = export(save_model(tiny_model(len(nfkc)), nfkc, tmp_path / "m"), "f16")
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: the tokenizer applies NFKC")
    with llama(path, nfkc) as server:  # the warning is true: full-width text splits differently
        assert server.tokenize("你好，世界") != nfkc.encode("你好，世界")
        assert server.tokenize("你好, world") == nfkc.encode("你好, world")


ROPE = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "llama3": {"rope_type": "llama3", "factor": 4.0, "original_max_position_embeddings": 16,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0},
}


@pytest.mark.parametrize("rope_type", ROPE)
def test_rope_scaling_logits_equal_ours_beyond_the_original_context(tmp_path, tiny_tokenizer, tiny_texts, rope_type):
    """A 16-token original context stretched 4x; rope_theta 500 puts every kind of frequency (kept, ramped,
    divided) within these 64 positions. Tied embeddings: the file then has no output.weight."""
    model = tiny_model(len(tiny_tokenizer), max_seq_len=64, rope_theta=500.0, rope_scaling_params=ROPE[rope_type],
                       tie_word_embeddings=True)
    path = export(save_model(model, tiny_tokenizer, tmp_path / "m"), "f32")
    ids = tiny_tokenizer.encode(" ".join(tiny_texts[:5]))[:63]  # with the token it predicts: 64
    with llama(path, tiny_tokenizer, n_ctx=64) as server:
        assert_top_matches(server, model, ids, range(15, 63, 6), 1e-4)


def test_chat_endpoint_answers_as_our_greedy_generation(tmp_path, tiny_tokenizer):
    """llama.cpp's OpenAI-compatible chat endpoint, spoken to with the official client, formats the
    conversation with the exported chat template and answers what model_sample.py --temperature 0 answers."""
    from openai import OpenAI

    from support.inference.text_generator import TextGenerator

    model_dir = save_model(tiny_model(len(tiny_tokenizer)), tiny_tokenizer, tmp_path / "m")
    path = export(model_dir, "f32")
    question = "房间很干净,服务也很周到。\n这条评论的情感是正面还是负面?"
    ours = TextGenerator(model_dir, device="cpu", dtype="float32").sft_sample(question, max_new_tokens=12,
                                                                               temperature=0)
    with llama(path, tiny_tokenizer) as server:
        client = OpenAI(base_url=server.url + "/v1", api_key="none")
        reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": question}],
                                               temperature=0, max_tokens=12)
    assert reply.choices[0].message.content == ours


def test_a_lora_adapter_exports_merged(tmp_path, tiny_tokenizer):
    """A peft adapter directory on an HF Llama base: the file computes what peft computes on transformers'
    LlamaForCausalLM with the adapter attached (unmerged), an independent reference."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    base_dir = save_model(tiny_model(len(tiny_tokenizer)), tiny_tokenizer, tmp_path / "base")
    peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj",
                                                                              "o_proj", "gate_proj", "down_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir)
    tiny_tokenizer.save_pretrained(adapter_dir)
    path = export(adapter_dir, "f32")
    ids = tiny_tokenizer.encode(PROMPTS[1] + " " + PROMPTS[0])
    with llama(path, tiny_tokenizer) as server:
        assert_top_matches(server, peft_model.eval(), ids, range(len(ids)), 1e-4)


def dynamic_model_dir(tmp_path, tokenizer) -> Path:
    scaling = {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 32}
    return save_model(tiny_model(len(tokenizer), rope_scaling_params=scaling), tokenizer, tmp_path / "dynamic")


def gpt2_dir(tmp_path, tokenizer) -> Path:
    from transformers import GPT2Config

    path = tmp_path / "gpt2"
    GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2).save_pretrained(path)
    (path / "model.safetensors").write_bytes(b"")  # never read: the config is refused first
    return path


@pytest.mark.parametrize("case, message", [
    ("outtype", "--outtype 'q4_k' is not supported (choose from f32, f16, bf16, q8_0)"),
    ("dynamic", "rope_type 'dynamic' has no GGUF form"),
    ("architecture", "k_model cannot express this model: model_type 'gpt2'"),
    ("unwritable", "cannot write"),
])
def test_bad_input_is_one_line_and_leaves_no_file(tmp_path, tiny_tokenizer, capsys, case, message):
    model_dir = {"dynamic": dynamic_model_dir, "architecture": gpt2_dir}.get(
        case, lambda t, tok: save_model(tiny_model(len(tok)), tok, t / "m"))(tmp_path, tiny_tokenizer)
    out = tmp_path / ("no_such_dir/x.gguf" if case == "unwritable" else "x.gguf")
    with pytest.raises(SystemExit) as e:
        export_gguf.main(["--model", str(model_dir), "--outfile", str(out),
                          "--outtype", "q4_k" if case == "outtype" else "f16"])
    error = str(e.value.code)
    assert error.startswith("error: ") and message in error and "\n" not in error, error
    assert not list(tmp_path.rglob("*.gguf*")) and not list(tmp_path.rglob("Modelfile"))
