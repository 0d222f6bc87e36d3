"""DPO (ddp_dpo.py): the loss and its gradients against transformers' Llama and the formula written out here;
torchrun 2 processes = 1 process; resume = uninterrupted; the reference model never changes; bad pairs and
bad flags refused; `data_process.py prefs` makes pairs from the model's own replies, never from test prompts."""
from __future__ import annotations

import copy
import json
import math
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import data_process
import ddp_dpo
from support.training import train_flags
import trainer
from dataset import PreferenceDataset
from support.model.hf_llama import LAYER_WEIGHTS, TOP_WEIGHTS, export_hf
from k_model import ModelConfig, Transformer
from support.loading.sources import open_model
from train_helpers import QUIET, read_metrics, run_script, write_jsonl

CPU = torch.device("cpu")


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def dialogue_pairs(n: int, offset: int = 0) -> list[tuple[list[dict], str, str]]:
    """(prompt messages, chosen reply, rejected reply): a chatterbot-corpus question, its answer, and another
    question's answer."""
    dialogues = data_process.read_dialogues()[offset : offset + 2 * n]
    pairs = []
    for d, other in zip(dialogues[:n], dialogues[n:]):
        if d[1]["content"] != other[1]["content"]:
            pairs.append(([d[0]], d[1]["content"], other[1]["content"]))
    return pairs


def as_record(prompt: list[dict], chosen: str, rejected: str, shape: int) -> dict:
    """The pair in one of the accepted shapes: 0 TRL with a string prompt, 1 TRL with message lists, 2 MiniMind."""
    if shape == 0 and len(prompt) == 1:
        return {"prompt": prompt[0]["content"], "chosen": chosen, "rejected": rejected}
    if shape == 2:
        return {"chosen": prompt + [assistant(chosen)], "rejected": prompt + [assistant(rejected)]}
    return {"prompt": prompt, "chosen": [assistant(chosen)], "rejected": [assistant(rejected)]}


def write_pairs(path: Path, pairs: list[tuple[list[dict], str, str]]) -> str:
    return str(write_jsonl(path, [as_record(*p, shape=i % 3) for i, p in enumerate(pairs)]))


def save_model(model: Transformer, out_dir: Path, tokenizer_dir: str) -> str:
    """An HF export with its tokenizer, as `--init_from` takes it."""
    from transformers import AutoTokenizer

    export_hf(model, out_dir)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out_dir)
    return str(out_dir)


def tiny_model(vocab_size: int, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    config = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size, max_seq_len=128)
    return Transformer(config)


@pytest.fixture(scope="module")
def run_files(tmp_path_factory, tiny_tokenizer, tiny_tokenizer_dir) -> dict[str, str]:
    """A tiny initial model and train / val pair files (the three shapes mixed), shared by the training tests."""
    root = tmp_path_factory.mktemp("dpo")
    return {"init": save_model(tiny_model(len(tiny_tokenizer)), root / "init", tiny_tokenizer_dir),
            "train": write_pairs(root / "train.jsonl", dialogue_pairs(72)),
            "val": write_pairs(root / "val.jsonl", dialogue_pairs(20, offset=200))}


def train_args(files: dict[str, str], tokenizer_dir: str, out_dir: Path, *extra: str) -> list[str]:
    return ["--init_from", files["init"], "--tokenizer_path", tokenizer_dir, "--data_path", files["train"],
            "--val_data_path", files["val"], "--out_dir", str(out_dir), "--max_seq_len", "48", *QUIET,
            "--learning_rate", "3e-3", "--log_interval", "1", "--save_interval", "100", "--sample_tokens", "0",
            *extra]


# ----------------------------------------------------------------------------------------------------------
# The pair reader


def test_every_pair_shape_gives_the_same_item(tmp_path, tiny_tokenizer):
    prompt = [user("What is AI?"), assistant("Artificial intelligence."), user("Are you one?")]
    records = [as_record(prompt, "Yes, I am.", "No.", shape) for shape in (1, 2)]
    sharegpt = [{"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]} for m in prompt]
    records.append({"chosen": sharegpt + [{"from": "gpt", "value": "Yes, I am."}],
                    "rejected": sharegpt + [{"from": "gpt", "value": "No."}]})
    data = PreferenceDataset(str(write_jsonl(tmp_path / "p.jsonl", records)), tiny_tokenizer, max_length=128)
    items = [data[i] for i in range(len(data))]
    for item in items[1:]:
        assert all(torch.equal(a, b) for a, b in zip(item, items[0]))
    x, y, mask = items[0]
    for row, reply in zip(range(2), ("Yes, I am.", "No.")):
        # the mask covers the last reply and its closing EOS only, not the earlier assistant turn
        assert tiny_tokenizer.decode(y[row][mask[row] == 1]) == reply + tiny_tokenizer.eos_token


BAD_PAIRS = [
    ({"prompt": "hi", "chosen": "hello"}, 'missing key "rejected"'),
    ({"prompt": "hi", "rejected": "hello"}, 'missing key "chosen"'),
    ({"prompt": "hi", "chosen": "hello", "rejected": "hello"}, "the same reply"),
    ({"chosen": [user("hi"), assistant("hello")], "rejected": [user("hey"), assistant("go away")]},
     "different prompts (message 0 differs)"),
    ({"chosen": [user("hi"), assistant("hello")], "rejected": [user("hi")]}, '"rejected" must end with an assistant'),
    ({"prompt": [user("hi"), assistant("hello")], "chosen": "a", "rejected": "b"}, "must end with a user message"),
    ({"prompt": "hi", "chosen": [user("a")], "rejected": "b"}, '"chosen" must be a string or a list of one assistant'),
    ({"text": "a document"}, "not a preference pair"),
    ({"prompt": "hi", "chosen": 3, "rejected": "b"}, '"chosen" must be a non-empty list'),
]


@pytest.mark.parametrize("record,reason", BAD_PAIRS, ids=[r for _, r in BAD_PAIRS])
def test_bad_pairs_are_refused_with_file_and_line(tmp_path, tiny_tokenizer, record, reason):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "hi", "chosen": "hello", "rejected": "go away"}, record])
    with pytest.raises(ValueError) as err:
        PreferenceDataset(str(path), tiny_tokenizer)
    assert str(err.value).startswith(f"{path}:2: ") and reason in str(err.value)


def test_skip_bad_counts_what_it_skips(tmp_path, tiny_tokenizer, capsys):
    good = {"prompt": "hi", "chosen": "hello", "rejected": "go away"}
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(good) + "\n{not json\n" + json.dumps({**good, "rejected": "hello"}) + "\n"
                    + json.dumps(good) + "\n", encoding="utf-8")
    assert len(PreferenceDataset(str(path), tiny_tokenizer, skip_bad=True)) == 2
    assert f"skipped 2 bad line(s); first: {path}:2: malformed JSON" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# The loss against an independent computation


def hf_reply_logp(hf, tokenizer, prompt: list[dict], reply: str, n: int) -> torch.Tensor:
    """log p(reply + <|im_end|> | prompt) under a transformers model, from the chat template's own
    tokenization, the sequence cut to its first n tokens as a training sample is."""
    def template(messages, **kw):
        return tokenizer.apply_chat_template(messages, tokenize=True, **kw)["input_ids"]

    prompt_ids = template(prompt, add_generation_prompt=True)
    ids = template(prompt + [assistant(reply)])
    assert ids[: len(prompt_ids)] == prompt_ids
    end = min(ids.index(tokenizer.eos_token_id, len(prompt_ids)) + 1, n)
    ids = ids[:n]
    logp = hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return sum(logp[t - 1, ids[t]] for t in range(len(prompt_ids), end))


def as_ours(hf_grads: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The gradient of our parameter `name` from the HF model's (our fused matrices are HF's stacked by rows)."""
    if name.startswith("layers."):
        _, i, weight = name.split(".", 2)
        parts = LAYER_WEIGHTS[weight.removesuffix(".weight")]
        return torch.cat([hf_grads[f"model.layers.{i}.{p}.weight"] for p in parts])
    return hf_grads[f"{TOP_WEIGHTS[name.removesuffix('.weight')]}.weight"]


@pytest.mark.cpu_kind
@pytest.mark.parametrize("loss,label_smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)])
def test_loss_and_gradients_match_an_independent_computation(tmp_path, tiny_tokenizer, tiny_tokenizer_dir, loss,
                                                             label_smoothing):
    from transformers import LlamaForCausalLM

    reference = tiny_model(len(tiny_tokenizer))
    policy = copy.deepcopy(reference)
    with torch.no_grad():  # a policy some way into training, so rewards and gradients are not trivial
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref_dir, policy_dir = (save_model(m, tmp_path / name, tiny_tokenizer_dir)
                           for m, name in ((reference, "ref"), (policy, "policy")))
    pairs = dialogue_pairs(5)
    pairs.append(([user("Hi"), assistant("Hello!"), user("Tell me a story.")],  # a shared earlier reply
                  "Once upon a time there was a very small model that wanted to learn. " * 3, "No."))  # cut off
    max_length, beta = 96, 0.5
    data = PreferenceDataset(write_pairs(tmp_path / "pairs.jsonl", pairs), tiny_tokenizer, max_length=max_length)
    task = ddp_dpo.DPO()
    given = train_flags.build_parser(task).parse_args(["--init_from", ref_dir, "--tokenizer_path", tiny_tokenizer_dir,
                                                   "--beta", str(beta), "--loss", loss,
                                                   "--label_smoothing", str(label_smoothing)])
    args, _ = train_flags.resolve_args(given, task)
    task.prepare(policy, args, tiny_tokenizer, CPU)
    batch = task.collate([data[i] for i in range(len(data))])
    sums = task.loss_sums(policy.train(), batch, CPU)
    assert float(task.loss_units(batch)) == len(pairs)
    (sums["loss"] / len(pairs)).backward()

    hf_policy, hf_ref = (LlamaForCausalLM.from_pretrained(d, dtype=torch.float32) for d in (policy_dir, ref_dir))
    logps = {name: torch.stack([torch.stack([hf_reply_logp(m, tiny_tokenizer, p[0], p[side], max_length + 1)
                                             for p in pairs]) for side in (1, 2)])
             for name, m in (("policy", hf_policy), ("ref", hf_ref))}  # (2, pairs): chosen, rejected
    ratio = logps["policy"] - logps["ref"].detach()
    h = ratio[0] - ratio[1]
    def loss_of(h: torch.Tensor) -> torch.Tensor:
        if loss == "sigmoid":
            return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
        return (h - 1 / (2 * beta)) ** 2
    losses = loss_of(h)
    losses.mean().backward()

    rewards = beta * ratio.detach()
    expected = {"loss": losses.mean(), "reward_chosen": rewards[0].mean(), "reward_rejected": rewards[1].mean(),
                "reward_margin": (rewards[0] - rewards[1]).mean(),
                "reward_accuracy": (rewards[0] > rewards[1]).float().mean()}
    # A token's log-prob is rounded to a few ulps of its log-sum-exp (~log V), in an order other CPUs' kernels
    # change; a reward sums up to max_length of them from two models, and rounding adds up like a random walk.
    per_token = 4 * torch.finfo(torch.float32).eps * math.log(len(tiny_tokenizer))
    atol = beta * per_token * math.sqrt(2 * max_length)
    for key, value in expected.items():
        torch.testing.assert_close(sums[key] / len(pairs), value.detach(), rtol=1e-5, atol=atol, msg=lambda m: f"{key}: {m}")
    hf_grads = {name: p.grad for name, p in hf_policy.named_parameters()}
    # each pair's gradient is dL/dh times that of h: h itself differs by up to 2 atol / beta (above), which moves
    # dL/dh by that times |L''/L'| (IPO's 1 / |h - 1/(2 beta)| grows where h nears its target)
    hs = h.detach().clone().requires_grad_()
    first = torch.autograd.grad(loss_of(hs).sum(), hs, create_graph=True)[0]
    second = torch.autograd.grad(first.sum(), hs)[0]
    rtol = 2 * atol / beta * float((second / first).abs().max())
    for name, p in policy.named_parameters():
        # each entry sums one float32 product per token of both replies of every pair, in another order than
        # transformers': the sums part by a random walk of ulps, 4 eps sqrt(tokens) of the largest entry
        expected = as_ours(hf_grads, name)
        walk = 4 * torch.finfo(torch.float32).eps * math.sqrt(2 * len(pairs) * max_length)
        torch.testing.assert_close(p.grad, expected, rtol=rtol, atol=walk * float(expected.abs().max()),
                                   msg=lambda m: f"{name}: {m}")
    # --precompute_ref_logps scores the pairs with the same reference
    scores = ddp_dpo.score_pairs(task.reference, data, batch_size=4, device=CPU, autocast=nullcontext)
    torch.testing.assert_close(scores, logps["ref"].detach().T, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Training runs


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    for key, weight in a["model"].items():
        torch.testing.assert_close(b["model"][key], weight, atol=atol, rtol=0, msg=key)


def test_ddp_matches_one_process(tmp_path, run_files, tiny_tokenizer_dir):
    """Global batch 8 pairs: 2 processes x 2 pairs x 2 accumulation steps, or 1 process x 8 pairs; the
    reference log-probs precomputed, by each process for half of the pairs."""
    common = train_args(run_files, tiny_tokenizer_dir, tmp_path, "--max_steps", "6", "--warmup_iters", "2",
                        "--eval_interval", "3", "--precompute_ref_logps")
    ddp = run_script("ddp_dpo.py", common + ["--out_dir", str(tmp_path / "ddp"), "--batch_size", "2",
                                             "--accumulation_steps", "2"], nproc=2)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "=== dpo: 2 process(es) on cpu" in ddp.stdout
    ddp_dpo.main(common + ["--out_dir", str(tmp_path / "one"), "--batch_size", "8"])
    one, two = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("one", "ddp"))
    assert one["step"] == two["step"] == 6 and two["world_size"] == 2
    assert_same_weights(one, two, atol=1e-5)
    for metric in ("loss", "reward_margin", "reward_accuracy", "val_loss", "val_reward_accuracy"):
        ref, got = read_metrics(tmp_path / "one", metric), read_metrics(tmp_path / "ddp", metric)
        assert [s for s, _ in got] == [s for s, _ in ref] and len(ref) in (2, 6)
        if metric == "reward_accuracy":  # at step 1 the policy is the reference: every margin is rounding noise,
            ref, got = ref[1:], got[1:]  # whose sign (what the accuracy counts) differs with the batch's split
        assert [v for _, v in got] == pytest.approx([v for _, v in ref], abs=1e-5)


def test_resume_matches_uninterrupted(tmp_path, run_files, tiny_tokenizer_dir):
    """4 steps, then --resume to step 8, equals 8 steps in one go, with dropout on (warmup spans the run, so
    the learning rate does not depend on where --max_steps ends it)."""
    common = train_args(run_files, tiny_tokenizer_dir, tmp_path, "--dropout", "0.1", "--warmup_iters", "100",
                        "--eval_interval", "4", "--batch_size", "4", "--accumulation_steps", "2")
    ddp_dpo.main(common + ["--out_dir", str(tmp_path / "whole"), "--max_steps", "8"])
    ddp_dpo.main(common + ["--out_dir", str(tmp_path / "split"), "--max_steps", "4"])
    ddp_dpo.main(common + ["--out_dir", str(tmp_path / "split"), "--max_steps", "8", "--resume"])
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("whole", "split"))
    assert a["step"] == b["step"] == 8 and a["data_position"] == b["data_position"]
    assert_same_weights(a, b)
    adam_a, adam_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert adam_a.keys() == adam_b.keys()
    assert all(torch.equal(x, y) for i in adam_a for x, y in zip(adam_a[i].values(), adam_b[i].values()))
    for metric in ("loss", "reward_chosen", "reward_rejected", "val_loss", "val_reward_margin"):
        assert read_metrics(tmp_path / "split", metric) == read_metrics(tmp_path / "whole", metric)


def test_the_reference_is_the_initial_model_and_never_changes(tmp_path, run_files, tiny_tokenizer_dir):
    task = ddp_dpo.DPO()
    trainer.main(task, train_args(run_files, tiny_tokenizer_dir, tmp_path / "run", "--max_steps", "5",
                                  "--batch_size", "8", "--warmup_iters", "1", "--eval_interval", "0"))
    initial, _, _ = open_model(run_files["init"], own_tokenizer=False)
    trained = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["model"]
    for name, weight in initial.state_dict().items():
        assert torch.equal(task.reference.state_dict()[name], weight), name
    assert not all(torch.equal(trained[k], v) for k, v in initial.state_dict().items())
    # step 1 is scored before the first update: policy = reference, so every reward is 0 and every pair a tie
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and first["reward_chosen"] == first["reward_rejected"] == 0.0
    assert first["reward_accuracy"] == 0.5 and first["loss"] == pytest.approx(0.693147, abs=1e-6)
    assert read_metrics(tmp_path / "run", "reward_margin")[-1][1] > 0  # and training moves it


# ----------------------------------------------------------------------------------------------------------
# Refused runs


def test_pairs_cut_away_by_max_seq_len_are_counted_or_refused(tmp_path, run_files, tiny_tokenizer_dir):
    long_prompt = [user("Please answer briefly after reading all of this: " + "blah " * 40)]
    fitting, cut_away = [([user(f"Hi {i}")], "Hello.", "Go away.") for i in range(8)], [(long_prompt, "Hm.", "No.")] * 4
    data = write_pairs(tmp_path / "some.jsonl", fitting + cut_away)
    args = train_args(run_files, tiny_tokenizer_dir, tmp_path / "some", "--max_steps", "1", "--batch_size", "8",
                      "--max_seq_len", "32", "--eval_interval", "0")
    ddp_dpo.main(args + ["--data_path", data])
    log = (tmp_path / "some" / "train.log").read_text()
    assert f"warning: {data}: 4 of its 12 samples (33.3%) have no target token within --max_seq_len 32" in log

    cut = write_pairs(tmp_path / "cut.jsonl", cut_away)
    with pytest.raises(SystemExit) as err:
        ddp_dpo.main(args + ["--data_path", cut, "--out_dir", str(tmp_path / "cut")])
    assert str(err.value).startswith(f"error: {cut}: none of its 4 samples has a target token")


@pytest.mark.parametrize("flags,message", [
    (["--beta", "0"], "--beta must be > 0, got 0.0"),
    (["--label_smoothing", "0.5"], "--label_smoothing must be in [0, 0.5), got 0.5"),
    (["--loss", "ipo", "--label_smoothing", "0.1"], "--label_smoothing applies to --loss sigmoid only, not --loss ipo"),
])
def test_bad_loss_flags_are_refused(tmp_path, run_files, tiny_tokenizer_dir, flags, message):
    with pytest.raises(SystemExit) as err:
        ddp_dpo.main(train_args(run_files, tiny_tokenizer_dir, tmp_path, *flags))
    assert str(err.value) == f"error: {message}"


def test_a_bad_pair_file_ends_the_run_with_its_line(tmp_path, run_files, tiny_tokenizer_dir):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "hi", "chosen": "yes", "rejected": "no"}] * 3
                      + [{"prompt": "hi", "chosen": "yes", "rejected": "yes"}])
    with pytest.raises(SystemExit) as err:
        ddp_dpo.main(train_args(run_files, tiny_tokenizer_dir, tmp_path, "--data_path", str(bad)))
    assert str(err.value).startswith(f"error: {bad}:4: ") and "--skip_bad" in str(err.value)


# ----------------------------------------------------------------------------------------------------------
# data_process.py prefs


def repeats_a_trigram(ids: list[int]) -> bool:
    seen = set()
    for i in range(len(ids) - 2):
        if tuple(ids[i : i + 3]) in seen:
            return True
        seen.add(tuple(ids[i : i + 3]))
    return False


def test_prefs_pairs_are_the_models_own_failures_and_never_test_prompts(tmp_path, run_files, tiny_tokenizer,
                                                                         tiny_tokenizer_dir):
    from transformers import LlamaForCausalLM

    reviews = data_process.read_reviews(max_chars=40)[:30]
    convs = [data_process.sentiment_conversation(text, label, 40) for text, label in reviews]
    convs += [{"conversations": d} for d in data_process.read_dialogues()[:10]]
    train = write_jsonl(tmp_path / "sft_train.jsonl", convs[:24] + convs[30:36])
    val = write_jsonl(tmp_path / "sft_val.jsonl", convs[24:27] + convs[36:])
    test = write_jsonl(tmp_path / "sft_test.jsonl", [{**c, "label": c["conversations"][1]["content"]}
                                                     for c in convs[27:30]])
    stats = data_process.build_prefs(run_files["init"], tiny_tokenizer_dir, {"train": str(train), "val": str(val)},
                                     str(test), str(tmp_path), max_new_tokens=16, device="cpu")
    hf = LlamaForCausalLM.from_pretrained(run_files["init"], dtype=torch.float32)
    label_tokens = max(len(tiny_tokenizer(label)["input_ids"]) for label in data_process.LABELS.values())
    checked = []
    for split, source in (("train", train), ("val", val)):
        out = tmp_path / f"dpo_{split}.jsonl"
        labelled = {json.dumps(c[:i]): m["content"] for c in (json.loads(line)["conversations"]
                    for line in source.read_text().splitlines()) for i, m in enumerate(c) if m["role"] == "assistant"}
        pairs = [json.loads(line) for line in out.read_text().splitlines()]
        assert stats[str(out)]["sentiment"]["pairs"] + stats[str(out)]["dialogue"]["pairs"] == len(pairs) > 0
        assert len(PreferenceDataset(str(out), tiny_tokenizer)) == len(pairs)
        for pair in pairs:
            assert labelled[json.dumps(pair["prompt"])] == pair["chosen"]  # a prompt of this split, its label
            if pair["rejected_by"] != "greedy":
                continue
            # rejected = the model's own greedy reply, as transformers generates it
            ids = tiny_tokenizer.apply_chat_template(pair["prompt"], add_generation_prompt=True,
                                                     return_tensors="pt")["input_ids"]
            max_new = 16 if pair["kind"] == "dialogue" else label_tokens + 1  # a label and EOS
            new = hf.generate(ids, max_new_tokens=max_new, do_sample=False, eos_token_id=tiny_tokenizer.eos_token_id,
                              pad_token_id=tiny_tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
            new = new[: new.index(tiny_tokenizer.eos_token_id)] if tiny_tokenizer.eos_token_id in new else new
            assert pair["rejected"] == tiny_tokenizer.decode(new, skip_special_tokens=True)
            assert pair["kind"] == "sentiment" or repeats_a_trigram(new)
            checked.append(pair["kind"])
    assert set(checked) == {"sentiment", "dialogue"}

    leaky = write_jsonl(tmp_path / "leaky.jsonl", [json.loads(line) for line in train.read_text().splitlines()][:5]
                        + [convs[28]])
    with pytest.raises(ValueError, match=f"^{leaky}:6: this prompt is in the test split"):
        data_process.build_prefs(run_files["init"], tiny_tokenizer_dir, {"train": str(leaky)}, str(test),
                                 str(tmp_path), device="cpu")
