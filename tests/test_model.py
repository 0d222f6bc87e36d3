"""k_model against independent references: transformers' LlamaForCausalLM, an uncached decode loop written
here, F.cross_entropy, and each prompt run alone."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, GenerationConfig, LlamaForCausalLM

from support.model import chunked_loss
from support.model import cpu_matmul
from support.model.chunked_loss import linear_cross_entropy
from support.model.cpu_matmul import mm_t, one_row_product
from support.model.hf_llama import export_hf, from_hf_llama, load_hf, to_hf_llama
from k_model import ModelConfig, Transformer, one_token_attention
from support.model.sampling import sample
from train_helpers import run_python

VOCAB = 97

pytestmark = pytest.mark.usefixtures("one_thread")

def tiny(seed: int = 0, **overrides) -> Transformer:
    """A small random model in eval mode. Weights are re-drawn with a larger std than the training init so
    the logits are far from uniform and greedy decoding is not decided by float noise."""
    torch.manual_seed(seed)
    kw = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, max_seq_len=64)
    kw.update(overrides)
    model = Transformer(ModelConfig(**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0.0, 0.08)
            else:
                p.uniform_(0.5, 1.5)  # non-trivial norm gains, so a swapped norm weight is caught
    return model


def uncached_greedy(model: Transformer, idx: torch.Tensor, n: int) -> torch.Tensor:
    """Reference decode: the full (cropped) sequence through forward() for every new token."""
    seq = idx
    with torch.no_grad():
        for _ in range(n):
            logits = model(seq[:, -model.config.max_seq_len :]).logits
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[:, idx.shape[1] :]


CONFIGS = {
    "gqa": dict(n_heads=4, n_kv_heads=2),
    "mha": dict(n_heads=4, n_kv_heads=4, hidden_dim=96, rope_theta=500.0),
    "mqa": dict(dim=96, n_heads=6, n_kv_heads=1, n_layers=3, norm_eps=1e-6),
}


@pytest.mark.cpu_kind
@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_hf_llama(name):
    model = tiny(**CONFIGS[name])
    hf = to_hf_llama(model).eval()
    assert isinstance(hf, LlamaForCausalLM)
    tokens = torch.randint(0, VOCAB, (3, 40))
    with torch.no_grad():
        ours, theirs = model(tokens).logits, hf(tokens).logits
    assert ours.shape == (3, 40, VOCAB)
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert model.num_params() == hf.num_parameters()


@pytest.mark.parametrize("flash_attn", [True, False])
def test_padded_forward_matches_hf_with_position_ids(flash_attn):
    """Left padding + attention_mask: real positions match HF given the same mask and per-row positions,
    and no NaN appears (a pad query whose every key is masked would give one)."""
    model = tiny(flash_attn=flash_attn)
    hf = to_hf_llama(model).eval()
    tokens = torch.randint(0, VOCAB, (3, 12))
    mask = torch.ones_like(tokens)
    mask[0, :5] = 0
    mask[1, :11] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = model(tokens, attention_mask=mask).logits
        theirs = hf(tokens, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    assert torch.isfinite(ours).all()
    assert (ours[real] - theirs[real]).abs().max().item() <= 1e-4


def test_math_attention_matches_sdpa():
    model = tiny()
    slow = tiny(flash_attn=False)
    tokens = torch.randint(0, VOCAB, (2, 30))
    with torch.no_grad():
        assert (model(tokens).logits - slow(tokens).logits).abs().max().item() <= 1e-4


def test_last_loss_is_unreduced_cross_entropy_ignoring_minus_100():
    model = tiny()
    tokens = torch.randint(0, VOCAB, (2, 16))
    targets = torch.randint(0, VOCAB, (2, 16))
    targets[0, :5] = -100
    targets[1, -3:] = -100
    out = model(tokens, targets)
    logits = model(tokens).logits
    ref = F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), ignore_index=-100, reduction="none")
    assert out.logits is None  # the loss never materialises them
    assert out.last_loss.shape == (32,) and out.last_loss.dtype == torch.float32
    torch.testing.assert_close(out.last_loss, ref)
    assert (out.last_loss[targets.reshape(-1) == -100] == 0).all()
    assert (out.last_loss[targets.reshape(-1) != -100] > 0).all()
    assert model(tokens).last_loss is None


def test_loss_mask_projects_only_masked_positions_with_same_losses_and_grads():
    tokens = torch.randint(0, VOCAB, (3, 16))
    targets = torch.randint(0, VOCAB, (3, 16))
    mask = torch.zeros(3, 16)
    mask[0, -2:] = 1
    mask[2, 4:9] = 1  # row 1 has no supervised position at all
    full, sparse = tiny(), tiny()
    ref = full(tokens, targets).last_loss * mask.reshape(-1)
    out = sparse(tokens, targets, loss_mask=mask)
    assert out.logits is None
    torch.testing.assert_close(out.last_loss, ref)
    ref.sum().backward()
    out.last_loss.sum().backward()
    for (name, p), q in zip(full.named_parameters(), sparse.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)
    with pytest.raises(ValueError, match="loss_mask shape"):
        sparse(tokens, targets, loss_mask=mask[:, :8])


def assert_grad_close(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """Float32 summation order differs between kernels: tolerance relative to the gradient's scale."""
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item(), msg=name)


def hf_named_grads(model: Transformer) -> dict[str, torch.Tensor]:
    """Our gradients under transformers' names: a copy of the model holding them as weights, converted."""
    holder = tiny()
    with torch.no_grad():
        for p, q in zip(holder.parameters(), model.parameters()):
            p.copy_(q.grad)
    return to_hf_llama(holder).state_dict()


@pytest.mark.cpu_kind
def test_loss_and_gradients_equal_hf_llama():
    """The whole training backward (our matmuls, the chunked loss) against LlamaForCausalLM's autograd."""
    model = tiny().train()
    hf = to_hf_llama(model).train()
    tokens = torch.randint(0, VOCAB, (3, 33))
    loss = model(tokens[:, :-1], tokens[:, 1:]).last_loss.mean()
    loss.backward()
    ref = hf(input_ids=tokens[:, :-1], labels=tokens[:, :-1]).loss  # HF shifts: the last input has no target
    hf_loss = hf(input_ids=tokens, labels=tokens).loss
    hf_loss.backward()
    torch.testing.assert_close(loss, hf_loss, rtol=1e-5, atol=1e-5)
    assert not torch.isclose(loss, ref)  # the comparison above is not vacuous
    ours = hf_named_grads(model)
    for name, p in hf.named_parameters():
        assert_grad_close(ours[name], p.grad, name)


@pytest.mark.cpu_kind
@pytest.mark.skipif(not cpu_matmul.ONEDNN, reason="matmuls go to torch's default BLAS in this build")
@pytest.mark.parametrize("library", ["onednn", "torch"])
def test_float32_matmul_and_its_gradients_equal_torch_matmul_in_either_library(monkeypatch, library):
    monkeypatch.setitem(cpu_matmul.CHOICE, "train", library)
    x = torch.randn(3, 5, 48, requires_grad=True)
    w = torch.randn(40, 48, requires_grad=True)
    torch.testing.assert_close(mm_t(x, w), x @ w.t())
    layer = cpu_matmul.Linear(48, 40)
    with torch.no_grad():
        layer.weight.copy_(w)
    g = torch.randn(3, 5, 40)
    (layer(x) * g).sum().backward()
    grad_x, grad_w = torch.autograd.grad((F.linear(x, w) * g).sum(), (x, w))
    torch.testing.assert_close(x.grad, grad_x)
    torch.testing.assert_close(layer.weight.grad, grad_w)


@pytest.mark.cpu_kind
def test_the_measured_matmul_choice_names_a_library_per_shape_class_and_is_cached(tmp_path):
    """measure_choice() answers for both shape classes; measured_once keeps the answer on disk per CPU,
    torch version and thread count, and a second call reads it instead of measuring."""
    from support.model.cpu_features import measured_once

    cache = tmp_path / "cache.json"
    choice = measured_once("matmul", cpu_matmul.measure_choice, cache)
    assert choice["train"] in ("onednn", "torch") and choice["decode"] in ("packed", "torch")
    assert measured_once("matmul", lambda: pytest.fail("measured twice"), cache) == choice
    assert f"{torch.get_num_threads()} threads" in cache.read_text()


@pytest.mark.cpu_kind
def test_bf16_decoding_works_where_onednn_cannot_pack_bf16(monkeypatch):
    """On a CPU without AVX512BW/VL/DQ or AVX_NE_CONVERT torch refuses to pack bf16 weights (the path crashed
    model_sample.py --dtype bfloat16 there): the decode products then read the weights as they are."""
    monkeypatch.setattr(cpu_matmul, "BF16_PACKED", False)
    model = tiny().to(torch.bfloat16)
    prompt = torch.randint(0, VOCAB, (2, 5))
    with model.packed_weights():
        assert not hasattr(model.layers[0].feed_forward.w13.weight, "_onednn_packed")
        tokens = model.generate(prompt, max_new_tokens=4, temperature=0.0)
    assert torch.equal(tokens, uncached_greedy(model, prompt, 4))


PACKED_DTYPES = [torch.float32] + ([torch.bfloat16] if cpu_matmul.BF16_PACKED else [])


@pytest.mark.cpu_kind
@pytest.mark.skipif(not cpu_matmul.ONEDNN, reason="matmuls go to torch's default BLAS in this build")
@pytest.mark.parametrize("dtype", PACKED_DTYPES)
def test_packed_weights_equal_the_weights_and_live_only_within_their_scope(monkeypatch, dtype):
    """Within packed_weights(), a decode-sized product (few rows, no gradient) reads a packed copy of each
    weight and equals F.linear; a nested scope keeps the copies, leaving the outer one drops them, and the
    next scope packs the weights as they are then (after a fused AdamW step, which no version count sees).
    bf16 only where this CPU packs bf16 (test_bf16_decoding_works_where_onednn_cannot_pack_bf16 elsewhere)."""
    monkeypatch.setitem(cpu_matmul.CHOICE, "decode", "packed")
    model = tiny().to(dtype)
    layer = model.layers[0].feed_forward.w13
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else {}

    def check_product():
        x = torch.randn(3, 1, layer.in_features, dtype=dtype)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight), **tol)

    with model.packed_weights():
        packed = layer.weight._onednn_packed
        check_product()
        with model.packed_weights():
            assert layer.weight._onednn_packed is packed
        assert layer.weight._onednn_packed is packed
    assert not hasattr(layer.weight, "_onednn_packed")
    model.train()
    model(torch.randint(0, VOCAB, (2, 8)), torch.randint(0, VOCAB, (2, 8))).last_loss.sum().backward()
    torch.optim.AdamW(model.parameters(), lr=0.1, fused=True).step()
    with model.packed_weights():
        check_product()
        with torch.no_grad():  # many rows (a prompt, an eval batch) read the weight itself
            many = torch.randn(2, cpu_matmul.DECODE_ROWS, layer.in_features, dtype=dtype)
            torch.testing.assert_close(layer(many), F.linear(many, layer.weight), **tol)


@pytest.mark.parametrize("chunk_rows, keep", [(7, False), (1000, False), (7, True)])
def test_linear_cross_entropy_equals_full_cross_entropy(monkeypatch, chunk_rows, keep):
    """Values and both gradients, with ignored targets and per-row upstream gradients (the trainer weights
    rows by its mask): logits recomputed in backward, in uneven chunks of 7 rows and in one chunk, and
    exp(logits - row max) kept from forward (few logits); a second backward through a kept graph gives the same."""
    monkeypatch.setattr(chunked_loss, "CE_CHUNK_LOGITS", chunk_rows * VOCAB)
    monkeypatch.setattr(chunked_loss, "CE_MIN_CHUNK_ROWS", 1)
    monkeypatch.setattr(chunked_loss, "CE_KEEP_LOGITS", 10**9 if keep else 0)
    h = torch.randn(40, 64, requires_grad=True)
    w = (0.3 * torch.randn(VOCAB, 64)).requires_grad_()
    targets = torch.randint(0, VOCAB, (40,))
    targets[[0, 13, 39]] = -100
    upstream = torch.rand(40)
    ours = linear_cross_entropy(h, w, targets)
    ref = F.cross_entropy(h @ w.t(), targets, reduction="none")
    torch.testing.assert_close(ours, ref)
    assert (ours[targets == -100] == 0).all()
    grads = torch.autograd.grad((ours * upstream).sum(), (h, w), retain_graph=True)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), (h, w))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)
    for g, again in zip(grads, torch.autograd.grad((ours * upstream).sum(), (h, w))):
        assert torch.equal(g, again)


@pytest.mark.cpu_kind
@pytest.mark.parametrize("keep", [True, False])
def test_linear_cross_entropy_under_bf16_autocast_matches_autocast_cross_entropy(monkeypatch, keep):
    """Both paths (kept; recomputed in chunks of 7 rows) under bf16 autocast."""
    if not keep:
        monkeypatch.setattr(chunked_loss, "CE_CHUNK_LOGITS", 7 * VOCAB)
        monkeypatch.setattr(chunked_loss, "CE_MIN_CHUNK_ROWS", 1)
        monkeypatch.setattr(chunked_loss, "CE_KEEP_LOGITS", 0)
    h = torch.randn(24, 64, requires_grad=True)
    w = (0.3 * torch.randn(VOCAB, 64)).requires_grad_()
    targets = torch.randint(0, VOCAB, (24,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = linear_cross_entropy(h, w, targets)
        ref = F.cross_entropy(F.linear(h, w).float(), targets, reduction="none")
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=0.02, atol=0.02)
    grads = torch.autograd.grad(ours.sum(), (h, w))
    ref_grads = torch.autograd.grad(ref.sum(), (h, w))
    for g, r in zip(grads, ref_grads):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, r, rtol=0.05, atol=0.02)


def test_compiled_train_step_equals_eager():
    """torch.compile(model), as the trainer's --compile does: same losses and gradients as eager, for the
    pretraining call and for the SFT call with a loss mask."""
    eager, compiled = tiny(dropout=0.0).train(), tiny(dropout=0.0).train()
    step = torch.compile(compiled)
    tokens = torch.randint(0, VOCAB, (2, 24))
    targets = torch.randint(0, VOCAB, (2, 24))
    targets[0, :3] = -100
    mask = torch.zeros(2, 24)
    mask[0, 5:9] = 1
    mask[1, 20:] = 1
    for kwargs in ({}, {"loss_mask": mask}):
        ref = eager(tokens, targets, **kwargs).last_loss
        out = step(tokens, targets, **kwargs).last_loss
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        ref.sum().backward()
        out.sum().backward()
        for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
            assert_grad_close(q.grad, p.grad, name)
            p.grad = q.grad = None


def test_compiled_decode_equals_eager_and_compiles_once(capfd):
    """compile_decode: one graph per batch kind, compiled by a first short generation (as model_sample and
    serve.py warm up: one prompt token, so the step attends to 2 slots, as many as the model's kv heads),
    then no recompile on another batch size, prompt, window width, a later token or new weights (the graph
    reads the weights, and their packed copies, at run time); the same greedy tokens as eager decoding for a
    padded batch that shifts past the window and for stream_generate."""
    eager, fast = tiny(max_seq_len=32), tiny(max_seq_len=32)
    fast.compile_decode()
    for rows in (1, 2):
        fast.generate(torch.ones(rows, 1, dtype=torch.long), 2, temperature=0)
    assert capfd.readouterr().err.count("fast decode: compiled the one-token step") == 2  # batch 1, batch > 1
    torch.manual_seed(1)
    with torch._dynamo.config.patch(error_on_recompile=True):
        idx, mask = left_pad([torch.randint(1, VOCAB, (n,)) for n in (5, 12, 2)])
        assert torch.equal(fast.generate(idx, 30, temperature=0, attention_mask=mask),
                           eager.generate(idx, 30, temperature=0, attention_mask=mask))
        prompt = torch.randint(0, VOCAB, (1, 9))
        streamed = list(fast.stream_generate(prompt, 20, temperature=0))
        assert streamed == list(eager.stream_generate(prompt, 20, temperature=0))
        longer = torch.randint(0, VOCAB, (4, 3))
        assert torch.equal(fast.generate(longer, 25, temperature=0), eager.generate(longer, 25, temperature=0))
        other = tiny(seed=5, max_seq_len=32)
        fast.load_state_dict(other.state_dict())
        assert torch.equal(fast.generate(prompt, 20, temperature=0), other.generate(prompt, 20, temperature=0))
    assert "torch.compile failed" not in capfd.readouterr().err


@pytest.mark.parametrize("kv_heads, dtype", [(2, torch.float32), (4, torch.float32), (2, torch.bfloat16)])
def test_the_compiled_steps_products_and_sums_equal_sdpa_and_linear(kv_heads, dtype):
    """What the compiled CPU decode step runs instead of SDPA and the packed products: one query per head
    against a cache with masked (unfilled or padding) slots, kv heads shared by two query heads or not, in
    float32 and in bf16 (autocast's caches), equals SDPA; one row times a weight equals F.linear."""
    B, H, S, D = 3, 4, 11, 8
    q, k, v = (torch.randn(shape).to(dtype) for shape in ((B, H, 1, D), (B, kv_heads, S, D), (B, kv_heads, S, D)))
    mask = torch.rand(B, 1, 1, S) > 0.4
    mask[..., 0] = True  # every row attends somewhere
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    tol = {} if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)  # bf16 rounding of the probabilities
    torch.testing.assert_close(one_token_attention(q, k, v, mask), ref, **tol)
    x, weight = torch.randn(1, 1, 64), torch.randn(96, 64)
    torch.testing.assert_close(one_row_product(x, weight), F.linear(x, weight))


def test_compile_decode_falls_back_to_eager_without_a_cxx_compiler(tmp_path):
    """A real failure: inductor pointed at a C++ compiler that does not exist (with an empty kernel cache, so
    nothing compiled earlier can stand in), in a fresh process. One line says why, and the tokens are eager's."""
    script = (
        "import os, sys, torch, torch._inductor.config\n"
        "torch._inductor.config.cpp.cxx = (None, os.environ['CXX'])  # as if CXX had been set before torch started\n"
        "sys.path.insert(0, 'tests')\n"
        "from test_model import tiny, VOCAB\n"
        "model = tiny()\n"
        "prompt = torch.randint(0, VOCAB, (2, 7))\n"
        "eager = model.generate(prompt, 12, temperature=0)\n"
        "model.compile_decode()\n"
        "print(torch.equal(model.generate(prompt, 12, temperature=0), eager), model._compiled_step)\n"
    )
    proc = run_python(["-c", script], timeout=300,
                      env={"CXX": str(tmp_path / "no-such-c++"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["True", "None"]
    failures = [line for line in proc.stderr.splitlines() if line.startswith("fast decode:")]
    assert len(failures) == 1 and "torch.compile failed" in failures[0] and "decoding eagerly" in failures[0]


def test_loss_mask_without_a_supervised_token_gives_zero_loss_and_gradients():
    """An SFT micro-batch whose answers were all cut off: nothing is projected, backward still runs."""
    model = tiny().train()
    tokens = torch.randint(0, VOCAB, (2, 16))
    out = model(tokens, tokens, loss_mask=torch.zeros(2, 16))
    assert out.last_loss.shape == (32,) and not out.last_loss.any()
    out.last_loss.sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and not p.grad.any(), name


@pytest.mark.cpu_kind
def test_bf16_autocast_forward_and_generate():
    model = tiny()
    tokens = torch.randint(0, VOCAB, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(tokens, tokens)
        new = model.generate(tokens, 4, temperature=0)
    assert out.last_loss.dtype == torch.float32 and new.shape == (2, 4)
    torch.testing.assert_close(out.last_loss.mean(), model(tokens, tokens).last_loss.mean(), rtol=0.05, atol=0.05)


def test_every_parameter_gets_a_gradient():
    model = tiny(dropout=0.1).train()
    tokens = torch.randint(0, VOCAB, (2, 16))
    model(tokens, tokens.roll(-1, 1)).last_loss.mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_residual_projections_get_scaled_init():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=512))
    small = 0.02 / math.sqrt(2 * 4)
    layer = model.layers[0]
    assert abs(layer.attention.wo.weight.std().item() - small) < 0.1 * small
    assert abs(layer.feed_forward.w2.weight.std().item() - small) < 0.1 * small
    assert abs(layer.attention.wqkv.weight.std().item() - 0.02) < 0.002
    assert model.output.weight is model.tok_embeddings.weight


@pytest.mark.parametrize("name", CONFIGS)
def test_kv_cache_greedy_equals_uncached_greedy(name):
    model = tiny(**CONFIGS[name])
    prompt = torch.randint(0, VOCAB, (2, 10))
    ours = model.generate(prompt, max_new_tokens=24, temperature=0)
    assert ours.shape == (2, 24)
    assert torch.equal(ours, uncached_greedy(model, prompt, 24))


def test_prompt_longer_than_max_seq_len_keeps_last_tokens():
    model = tiny()
    prompt = torch.randint(0, VOCAB, (2, 100))
    assert torch.equal(model.generate(prompt, 8, temperature=0), model.generate(prompt[:, -64:], 8, temperature=0))


def test_greedy_matches_hf_generate_of_exported_model(tmp_path):
    model = tiny()
    export_hf(model, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    prompt = torch.randint(0, VOCAB, (2, 8))
    gen = GenerationConfig(max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=gen)[:, 8:]
    assert torch.equal(model.generate(prompt, 32, temperature=0), theirs)


def left_pad(prompts: list[torch.Tensor], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), width), pad)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        idx[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    return idx, mask


def test_padded_batch_equals_each_prompt_alone():
    model = tiny()
    torch.manual_seed(1)
    prompts = [torch.randint(1, VOCAB, (n,)) for n in (3, 11, 1, 7)]
    idx, mask = left_pad(prompts)
    batch = model.generate(idx, 20, temperature=0, attention_mask=mask)
    for row, p in zip(batch, prompts):
        assert torch.equal(row, model.generate(p[None], 20, temperature=0)[0])


def test_stop_id_stops_each_row_and_fills_with_its_stop_token():
    model = tiny()
    prompt = torch.randint(0, VOCAB, (3, 6))
    free = model.generate(prompt, 20, temperature=0)
    # stop ids: row 0's 3rd token and row 1's 6th token (each may also stop other rows earlier)
    stops = [int(free[0, 2]), int(free[1, 5])]
    out = model.generate(prompt, 20, temperature=0, stop_id=stops)
    expected, ends = [], []
    for row in free.tolist():
        hit = next((i for i, t in enumerate(row) if t in stops), None)
        expected.append(row if hit is None else row[: hit + 1] + [row[hit]] * (len(row) - hit - 1))
        ends.append(len(row) if hit is None else hit + 1)
    n = max(ends)  # stops early only if every row stopped
    assert out.shape == (3, n)
    assert out.tolist() == [e[:n] for e in expected]


def test_stream_generate_equals_generate():
    model = tiny()
    prompt = torch.randint(0, VOCAB, (1, 9))
    full = model.generate(prompt, 25, temperature=0)[0].tolist()
    assert list(model.stream_generate(prompt, 25, temperature=0)) == full
    stop = full[7]
    streamed = list(model.stream_generate(prompt, 25, temperature=0, stop_id=stop))
    assert streamed == full[: full.index(stop)]


def test_sampling_filters_reduce_to_greedy():
    model = tiny()
    prompt = torch.randint(0, VOCAB, (2, 5))
    greedy = model.generate(prompt, 10, temperature=0)
    torch.manual_seed(0)
    assert torch.equal(model.generate(prompt, 10, temperature=1.0, top_k=1), greedy)
    assert torch.equal(model.generate(prompt, 10, temperature=0.7, top_p=1e-6), greedy)
    sampled = model.generate(prompt, 10, temperature=1.5, top_k=20, top_p=0.9)
    assert sampled.shape == (2, 10) and sampled.min() >= 0 and sampled.max() < VOCAB


@pytest.mark.parametrize(
    "kw",
    [dict(temperature=-1.0), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5),
     dict(attention_mask=torch.ones(2, 3, dtype=torch.long))],
)
def test_bad_generate_arguments_raise(kw):
    with pytest.raises(ValueError):
        tiny().generate(torch.randint(0, VOCAB, (2, 5)), 4, **kw)


def test_bad_prompt_shapes_raise():
    model = tiny()
    with pytest.raises(ValueError, match="at least one prompt token"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="one row"):
        next(model.stream_generate(torch.zeros(2, 3, dtype=torch.long), 4))
    with pytest.raises(ValueError, match="exceeds max_seq_len 64"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_top_k_and_top_p_keep_only_the_most_likely_tokens():
    probs = torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]])
    logits = probs.log().expand(2000, -1)
    torch.manual_seed(0)
    assert set(sample(logits, 1.0, top_k=2, top_p=None).tolist()) == {1, 3}
    # top_p 0.5: 0.4 alone does not reach it, 0.4 + 0.3 does -> tokens 1 and 3
    assert set(sample(logits, 1.0, top_k=None, top_p=0.5).tolist()) == {1, 3}
    assert set(sample(logits, 1.0, top_k=None, top_p=0.75).tolist()) == {1, 3, 4}
    assert set(sample(logits, 1.0, top_k=None, top_p=None).tolist()) == {0, 1, 2, 3, 4}


def test_export_load_round_trip(tmp_path):
    model = tiny(**CONFIGS["mqa"])
    export_hf(model, tmp_path)
    assert (tmp_path / "config.json").is_file() and (tmp_path / "model.safetensors").is_file()
    assert isinstance(AutoModelForCausalLM.from_pretrained(tmp_path), LlamaForCausalLM)
    back = load_hf(tmp_path).eval()
    assert back.config.to_dict() == model.config.to_dict()
    tokens = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        assert torch.equal(back(tokens).logits, model(tokens).logits)
    assert torch.equal(from_hf_llama(to_hf_llama(model))(tokens).logits, model(tokens).logits)


def test_save_pretrained_from_pretrained_round_trip(tmp_path):
    """Our own class through transformers' save/load: tied weights restored, rotary tables recomputed."""
    model = tiny()
    model.save_pretrained(tmp_path)
    back = Transformer.from_pretrained(tmp_path).eval()
    assert back.output.weight is back.tok_embeddings.weight
    tokens = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        assert torch.equal(back(tokens).logits, model(tokens).logits)


def test_from_hf_llama_refuses_what_it_cannot_express():
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, attention_bias=True, tie_word_embeddings=False)
    with pytest.raises(ValueError, match=r"cannot express this model: attention_bias True \("):  # untied is fine
        from_hf_llama(LlamaForCausalLM(cfg))


def test_load_hf_missing_dir_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(tmp_path)


@pytest.mark.parametrize(
    "kw, numbers",
    [
        (dict(dim=100, n_heads=16), ["100", "16"]),
        (dict(dim=64, n_heads=8, n_kv_heads=3), ["8", "3"]),
        (dict(dim=72, n_heads=8, n_kv_heads=4), ["72", "8", "9"]),
        (dict(n_layers=0), ["n_layers", "0"]),
        (dict(dropout=1.5), ["1.5"]),
        (dict(hidden_dim=-4), ["hidden_dim", "-4"]),
    ],
)
def test_bad_config_raises_naming_the_numbers(kw, numbers):
    with pytest.raises(ValueError) as err:
        ModelConfig(**kw)
    for n in numbers:
        assert n in str(err.value)


def test_config_defaults_and_round_trip():
    cfg = ModelConfig()
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size) == (768, 12, 16, 8, 6144)
    assert cfg.hidden_dim == 2048 and cfg.max_seq_len == 512 and cfg.model_type == "k_model"
    assert ModelConfig(**cfg.to_dict()).to_dict() == cfg.to_dict()


def test_flops_per_token():
    model = tiny()
    cfg = model.config
    assert model.flops_per_token(64) == 6 * model.num_params() + 12 * cfg.n_layers * cfg.dim * 64
