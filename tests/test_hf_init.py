"""Any LlamaForCausalLM as a starting point (--init_from): checkpoints built and saved by transformers itself
(random weights; tied or untied embeddings, bf16 storage, GQA / MQA, an explicit head_dim, other rope_theta,
rms_norm_eps and max_position_embeddings) load with transformers' logits and export back to them; what the
model cannot express is refused, naming the config key; and a base model with its own tokenizer (other special
tokens, no chat template) continues pretraining on our corpus, then SFT adds our chat template to it."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, PreTrainedTokenizerFast)
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

import data_process
import ddp_pretrain
import ddp_sft_full
from support.loading.checkpoint import rebuilt
from dataset import PretrainDataset, document_start_ids, encode_chat
from support.model.hf_llama import export_hf
from support.loading.sources import initial_model, open_model, with_chat_template
from support.data.tokenizer_spec import CHAT_MARKERS, CHAT_TEMPLATE
from test_data import CONVERSATIONS, oracle
from test_tool_data import TOOL_CHAT, TOOLS, tool_oracle
from train_helpers import QUIET, make_pretrain_data, make_sft_data, read_metrics, write_jsonl

VOCAB = 600


def save_llama(path: Path, dtype: torch.dtype = torch.float32, config_class=LlamaConfig, model_class=LlamaForCausalLM,
               **overrides) -> LlamaConfig:
    """A randomly initialised model of transformers' own, saved with save_pretrained in `dtype`."""
    torch.manual_seed(0)
    shape = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=48, initializer_range=0.1)
    config = config_class(**{**shape, **overrides})
    model_class(config).to(dtype).save_pretrained(path)
    return config


def save_foreign_tokenizer(path: Path, texts: list[str], add_bos_token: bool = False) -> PreTrainedTokenizerFast:
    """A Llama-style tokenizer unlike ours: <unk> <s> </s>, BOS <s>, EOS </s>, no pad, no chat template;
    add_bos_token: it starts every encoded text with <s>, as Llama's own tokenizers do."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   add_bos_token=add_bos_token)
    fast.save_pretrained(path)
    return fast


FOREIGN = {
    "tied_gqa_fp32": dict(tie_word_embeddings=True, rope_theta=500000.0, rms_norm_eps=1e-6),
    "untied_mha_bf16": dict(tie_word_embeddings=False, num_key_value_heads=4, dtype=torch.bfloat16),
    "head_dim_mqa_untied": dict(tie_word_embeddings=False, head_dim=24, num_key_value_heads=1),  # 4 x 24 != 64
}
KEPT = ("tie_word_embeddings", "head_dim", "num_key_value_heads", "rms_norm_eps", "max_position_embeddings",
        "intermediate_size")


@pytest.mark.parametrize("name", FOREIGN)
def test_logits_equal_transformers_and_the_export_keeps_them(tmp_path, name):
    config = save_llama(tmp_path / "llama", **FOREIGN[name])
    ours, _, info = open_model(tmp_path / "llama", own_tokenizer=False)
    ours = ours.float()  # training's master weights; bf16 -> float32 is exact
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "llama", dtype=torch.float32).eval()
    tokens = torch.randint(0, VOCAB, (2, 40))
    with torch.no_grad():
        logits = ours(tokens).logits
        torch.testing.assert_close(logits, theirs(tokens).logits, atol=1e-4, rtol=0)
        export_hf(ours, tmp_path / "export")
        again = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
        torch.testing.assert_close(again(tokens).logits, logits, atol=1e-5, rtol=0)
    for key in KEPT:
        assert getattr(again.config, key) == getattr(config, key), key
    assert again.config.rope_parameters["rope_theta"] == config.rope_parameters["rope_theta"]
    assert (ours.output.weight is ours.tok_embeddings.weight) == config.tie_word_embeddings


def test_rotary_tables_stay_float32_in_a_bf16_model(tmp_path):
    """Positions are angles: rounded to bf16 (error ~2e-3) they would stay rounded when training upcasts to
    float32 master weights, so a run whose model was rebuilt (grown vocabulary, --dropout, --resume of LoRA)
    or cast would train with other positions than its export uses. transformers' own float32 tables are
    the reference, whatever the weights are stored in."""
    config = save_llama(tmp_path / "llama", dtype=torch.bfloat16)
    stored, _, _ = open_model(tmp_path / "llama", own_tokenizer=False)
    position_ids = torch.arange(config.max_position_embeddings)[None]
    cos, sin = (t[0] for t in LlamaRotaryEmbedding(config)(torch.zeros(1), position_ids))
    models = {"loaded": stored, "rebuilt": rebuilt(stored, vocab_size=VOCAB + 2, dropout=0.1),
              "cast": copy.deepcopy(stored).float().to(torch.bfloat16), "rebuilt, upcast": rebuilt(stored, dropout=0.1).float()}
    for name, model in models.items():
        assert model.tok_embeddings.weight.dtype == (torch.float32 if "upcast" in name else torch.bfloat16)
        assert model.rope_cos.dtype == model.rope_sin.dtype == torch.float32, name
        assert torch.equal(model.rope_cos, cos) and torch.equal(model.rope_sin, sin), name


REFUSED = {
    # linear, dynamic, yarn and llama3 load (test_rope_scaling.py); Phi-3's longrope does not
    "rope_type": dict(rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                                    "original_max_position_embeddings": 24}),
    "attention_bias": dict(attention_bias=True),
    "mlp_bias": dict(mlp_bias=True),
    "hidden_act": dict(hidden_act="gelu"),
    "model_type": dict(config_class=MistralConfig, model_class=MistralForCausalLM),
}


@pytest.mark.parametrize("key", REFUSED)
def test_what_the_model_cannot_express_is_refused_by_name(tmp_path, key):
    save_llama(tmp_path / "llama", **REFUSED[key])
    with pytest.raises(ValueError, match=f"config.json: .*{key}"):
        open_model(tmp_path / "llama", own_tokenizer=False)


def test_the_command_line_names_the_key(tmp_path, tiny_tokenizer_dir):
    save_llama(tmp_path / "llama", attention_bias=True)
    with pytest.raises(SystemExit, match=r"^error: .*config.json: .*attention_bias"):
        ddp_pretrain.main(["--init_from", str(tmp_path / "llama"), "--tokenizer_path", tiny_tokenizer_dir,
                           "--out_dir", str(tmp_path / "out")])


@pytest.mark.parametrize("tokenizer", ["adds <s>", "ours"])
def test_pretokenized_documents_begin_as_the_tokenizer_begins_a_text(tmp_path, tiny_texts, tiny_tokenizer_dir,
                                                                     capsys, tokenizer):
    """A Llama tokenizer that adds <s> (add_bos_token) began every document of its model's pretraining with it:
    pretokenized, each document is what the tokenizer itself makes of the text, <s> included, then EOS. Ours
    adds no BOS, and its documents stay text + EOS. The summary says which; a prompt to continue (sampling,
    the trainer's samples) begins the same way, after the EOS that ends the document before."""
    tok_dir = tiny_tokenizer_dir if tokenizer == "ours" else tmp_path / "llama"
    if tokenizer == "adds <s>":
        save_foreign_tokenizer(tok_dir, tiny_texts, add_bos_token=True)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    docs = ["人民日报一九九八年元旦献辞。", "Hello world, 12345", "短"]
    src = write_jsonl(tmp_path / "corpus.jsonl", [{"text": d} for d in docs])
    data_process.main(["pretokenize", "--input", str(src), "--tokenizer", str(tok_dir), "--num_workers", "1"])
    tokens = np.fromfile(tmp_path / "corpus.bin", dtype=np.uint16).tolist()
    assert tokens == [t for d in docs for t in tok(d)["input_ids"] + [tok.eos_token_id]]
    with_bos = tokenizer == "adds <s>"
    assert tokens.count(tok.bos_token_id) == (len(docs) if with_bos else 0)
    assert document_start_ids(tok, "Hello") == [tok.eos_token_id] + tok("Hello")["input_ids"]
    summary = capsys.readouterr().out
    assert ("each BOS <s> + text + EOS </s>: the tokenizer adds BOS" if with_bos
            else "each text + EOS <|im_end|>: the tokenizer adds no BOS") in summary, summary


def val_loss(model: torch.nn.Module, val: PretrainDataset) -> float:
    """Mean next-token loss of a transformers model over every window, as the trainer's evaluation reads it."""
    x, y = (torch.stack([val[i][k] for i in range(len(val))]) for k in (0, 1))
    with torch.no_grad():
        logits = model(x).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).item()


def test_a_foreign_base_continues_pretraining_then_learns_to_chat(tmp_path, tiny_texts):
    base = tmp_path / "llama"  # untied, GQA, stored in bf16, with its own tokenizer and no chat template
    tok = save_foreign_tokenizer(base, tiny_texts)
    save_llama(base, dtype=torch.bfloat16, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
               eos_token_id=tok.eos_token_id)
    train_bin, val_bin = make_pretrain_data(tmp_path, str(base), n_train=300, n_val=30)  # its tokenizer, its EOS
    before = val_loss(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                      PretrainDataset(val_bin, tok, max_length=32))

    pre = tmp_path / "pretrain"
    ddp_pretrain.main(["--init_from", str(base), "--data_path", train_bin, "--val_data_path", val_bin,
                       "--out_dir", str(pre), *QUIET, "--max_seq_len", "32", "--batch_size", "8", "--max_steps", "40",
                       "--learning_rate", "3e-3", "--warmup_iters", "5", "--eval_interval", "40",
                       "--log_interval", "10"])
    log = (pre / "train.log").read_text(encoding="utf-8")
    assert f"from {base}" in log and "stores bfloat16 weights: training float32 master weights" in log
    (_, after), = read_metrics(pre, "val_loss")
    assert after < before - 0.5, (before, after)
    exported = json.loads((pre / "hf" / "config.json").read_text())
    assert exported["tie_word_embeddings"] is False and exported["vocab_size"] == VOCAB

    # SFT from the continued model: its tokenizer (the base's) has no chat template, so ours is added, with
    # <|im_start|> <|im_end|> and the six markers of reasoning and tool calls
    chat_tok = with_chat_template(AutoTokenizer.from_pretrained(base))
    assert chat_tok.convert_ids_to_tokens(list(range(VOCAB, VOCAB + 8))) == ["<|im_start|>", "<|im_end|>", *CHAT_MARKERS]
    grown = initial_model(pre, chat_tok).model
    for weight in (grown.tok_embeddings.weight, grown.output.weight):  # eight new rows, each the mean row
        assert weight.shape[0] == VOCAB + 8
        torch.testing.assert_close(weight[VOCAB:], weight[:VOCAB].mean(0).expand(8, -1))
    sft_train, sft_val = make_sft_data(tmp_path)
    ddp_sft_full.main(["--init_from", str(pre), "--data_path", sft_train, "--val_data_path", sft_val,
                       "--out_dir", str(tmp_path / "sft"), *QUIET, "--max_seq_len", "32", "--batch_size", "8",
                       "--max_steps", "4", "--log_interval", "2"])
    hf_dir = tmp_path / "sft" / "hf"
    exported_tok = AutoTokenizer.from_pretrained(hf_dir)
    assert exported_tok.chat_template == CHAT_TEMPLATE and len(exported_tok) == VOCAB + 8
    assert (exported_tok.bos_token, exported_tok.eos_token, exported_tok.unk_token) == ("<s>", "<|im_end|>", "<unk>")
    assert exported_tok.convert_tokens_to_ids("</s>") == tok.eos_token_id  # the base's tokens keep their ids
    assert AutoModelForCausalLM.from_pretrained(hf_dir).config.vocab_size == VOCAB + 8
    for messages in CONVERSATIONS:
        assert encode_chat(exported_tok, messages) == oracle(exported_tok, messages)
    assert encode_chat(exported_tok, TOOL_CHAT, tools=TOOLS) == tool_oracle(exported_tok, TOOL_CHAT, TOOLS)
