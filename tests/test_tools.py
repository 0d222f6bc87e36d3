"""Tools (tools.py, support/inference/tool_loop.py, data_process.py tools): the calculator computes what Python
computes and runs nothing else; a tools file loads with the schemas transformers makes, and a bad one fails in
one line; the loop's trajectory is the chat template's encoding of the conversation, with exactly the model's
tokens marked as generated; a raising or unknown tool gives the model the error; rounds and budget are bounded;
the tool task's data holds out its test problems and never trains on a tool's result."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

import tools as tools_file
from dataset import encode_chat
from support.inference.tool_calls import ToolCall
from support.inference.tool_loop import Tools, load_tools, run_tool, run_tool_loop, tool_turn_ids

CALCULATOR_SCHEMA = {  # written out here: what apply_chat_template(tools=[calculator]) renders
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate + - * / and parentheses on numbers.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string", "description": "e.g. 37+48"}},
                       "required": ["expression"]},
        "return": {"type": "string"},
    },
}


def test_calculator_computes_what_python_computes_and_runs_nothing_else():
    rng = random.Random(0)
    for _ in range(200):
        a, b, c = (rng.randint(-999, 999) for _ in range(3))
        op1, op2 = rng.choice("+-*/"), rng.choice("+-*")
        expression = f"({a}{op1}{b}){op2}{c}" if b or op1 != "/" else f"{a}+{c}"
        assert float(tools_file.calculator(expression)) == pytest.approx(eval(expression), rel=1e-9), expression
    assert tools_file.calculator("37+48") == "85" and tools_file.calculator(" 7 / 2 ") == "3.5"
    assert tools_file.calculator("3.0*2") == "6" and tools_file.calculator("-(2-5)") == "3"
    for refused in ("2**10", "__import__('os')", "x+1", "abs(-1)", "1 if 1 else 2", "'a'*3", "[1]"):
        with pytest.raises(ValueError, match="only numbers"):
            tools_file.calculator(refused)
    with pytest.raises(ValueError, match="not an arithmetic expression"):
        tools_file.calculator("1+")
    with pytest.raises(ValueError, match="too large"):
        tools_file.calculator("1e300*1e300")


BAD_TOOLS = '''
def undocumented(x: int) -> int:
    return x
'''


def test_a_tools_file_loads_with_its_schemas_and_a_bad_one_fails_in_one_line(tmp_path):
    loaded = load_tools("tools.py")
    assert list(loaded.functions) == ["calculator"] and loaded.schemas == [CALCULATOR_SCHEMA]
    (tmp_path / "bad.py").write_text(BAD_TOOLS)
    (tmp_path / "empty.py").write_text("import math\n_private = lambda: 1\n")
    (tmp_path / "broken.py").write_text("def f(:\n")
    for file, message in (("bad.py", r"bad.py: undocumented: .*docstring"), ("empty.py", "defines no public function"),
                          ("broken.py", "importing .*broken.py failed: SyntaxError")):
        with pytest.raises(ValueError, match=message) as err:
            load_tools(str(tmp_path / file))
        assert "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="--tools: nowhere.py: no such file"):
        load_tools("nowhere.py")


def test_a_raising_or_unknown_tool_gives_the_model_the_error_text():
    tools = Tools("t.py", {"calculator": tools_file.calculator, "listing": lambda: [1, "二"]}, [])
    assert run_tool(tools, ToolCall("calculator", {"expression": "2*21"})) == "42"
    assert run_tool(tools, ToolCall("calculator", {"expression": "1/0"})) == "error: ZeroDivisionError: division by zero"
    assert run_tool(tools, ToolCall("calculator", {"x": "1"})).startswith("error: TypeError: ")
    assert run_tool(tools, ToolCall("search", {})) == "error: there is no tool 'search' (the tools: calculator, listing)"
    assert run_tool(tools, ToolCall("listing", {})) == '[1, "二"]'


def call(expression: str, call_id: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": "calculator", "arguments": {"expression": expression}}}


def conversations() -> list[list[dict]]:
    """Two conversations as the chat template's oracle: one calls the calculator twice (once wrongly, reading the
    error), the other answers without a call."""
    return [
        [{"role": "user", "content": "37加48等于多少?"},
         {"role": "assistant", "content": "", "tool_calls": [call("37+48=", "call_0_0")]},
         {"role": "tool", "tool_call_id": "call_0_0", "content": "error: ValueError: not an arithmetic expression: "
                                                                 "'37+48='"},
         {"role": "assistant", "content": "算一下", "tool_calls": [call("37+48", "call_1_0"), call("48", "call_1_1")]},
         {"role": "tool", "tool_call_id": "call_1_0", "content": "85"},
         {"role": "tool", "tool_call_id": "call_1_1", "content": "48"},
         {"role": "assistant", "content": "37+48=85"}],
        [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好!"}],
    ]


def scripted_model(bodies: list[list[list[int]]]):
    """A generate function that writes, in round r of row i, the ids of bodies[i][r] (a row's turns as the
    template encodes them), and records the prompts it was given."""
    seen = []

    def generate(rows, prompts, max_new_tokens, round_):
        seen.append(prompts)
        return [bodies[i][round_][:max_new_tokens] for i in rows]

    return generate, seen


def assistant_bodies(mask: list[int], ids: list[int]) -> list[list[int]]:
    """The runs of masked ids: each assistant turn's body through its EOS."""
    runs, current = [], []
    for i, m in zip(ids, mask):
        if m:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def test_the_trajectory_is_the_template_encoding_with_only_the_model_tokens_generated(tiny_tokenizer):
    """Independent construction: encode_chat of the whole conversation (SFT's encoder) gives the ids, and its
    assistant mask the tokens a model writes; the loop, fed those replies, must rebuild the same ids with the
    real calculator's results and mark exactly the masked tokens as generated (what GRPO's loss trains on)."""
    tools = load_tools("tools.py")
    convs = conversations()
    encoded = [encode_chat(tiny_tokenizer, c, tools=tools.schemas) for c in convs]
    prompts = [encode_chat(tiny_tokenizer, c[:1], add_generation_prompt=True, tools=tools.schemas)[0] for c in convs]
    generate, seen = scripted_model([assistant_bodies(mask[len(p):], ids[len(p):])
                                     for (ids, mask), p in zip(encoded, prompts)])
    out = run_tool_loop(generate, prompts, tiny_tokenizer, tools, max_new_tokens=400, max_rounds=3)
    for t, (ids, mask), p, conv in zip(out, encoded, prompts, convs):
        end = max(i for i, m in enumerate(mask) if m) + 1  # the last reply's EOS: the template's newline follows
        assert p + t.ids == ids[:end]
        assert [0] * len(p) + t.generated == mask[:end]
        want = [{**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": json.dumps(
            c["function"]["arguments"])}} for c in m["tool_calls"]]} if "tool_calls" in m else m for m in conv[1:]]
        assert t.messages == want and t.answer == conv[-1]["content"]
    assert [out[0].num_calls, out[1].num_calls] == [3, 0]
    assert [len(prompts) for prompts in seen] == [2, 1, 1]  # the direct answer leaves the batch after round 0


def test_rounds_and_the_token_budget_are_bounded(tiny_tokenizer):
    """A model that calls forever: max_rounds rounds of calls run, the next reply's calls are kept but not run;
    with a smaller budget the trajectory is cut inside a tool turn and ends there."""
    tools = load_tools("tools.py")
    conv = conversations()[0][:3]
    ids, mask = encode_chat(tiny_tokenizer, conv, tools=tools.schemas)
    prompt = encode_chat(tiny_tokenizer, conv[:1], add_generation_prompt=True, tools=tools.schemas)[0]
    body = assistant_bodies(mask[len(prompt):], ids[len(prompt):])[0]
    generate, seen = scripted_model([[body] * 10])
    (t,) = run_tool_loop(generate, [prompt], tiny_tokenizer, tools, max_new_tokens=1000, max_rounds=2)
    assert len(seen) == 3 and t.num_calls == 2
    assert [m["role"] for m in t.messages] == ["assistant", "tool", "assistant", "tool", "assistant"]
    assert "tool_calls" in t.messages[-1] and t.ids[-1] == tiny_tokenizer.eos_token_id and t.answer == ""
    turn = tool_turn_ids(tiny_tokenizer, [t.messages[1]])
    budget = len(body) + len(turn) // 2
    (cut,) = run_tool_loop(generate, [prompt], tiny_tokenizer, tools, max_new_tokens=budget, max_rounds=2)
    assert cut.ids == body + turn[: len(turn) // 2] and cut.generated == [1] * len(body) + [0] * (len(turn) // 2)
    assert len(seen) == 4  # no generation after the cut


def test_without_tools_the_loop_is_one_plain_generation(tiny_tokenizer):
    generate, seen = scripted_model([[tiny_tokenizer("<tool_call>x</tool_call>好")["input_ids"]]])
    (t,) = run_tool_loop(generate, [[1, 2]], tiny_tokenizer, None, max_new_tokens=50)
    assert len(seen) == 1 and t.num_calls == 0 and t.generated == [1] * len(t.ids)
    assert t.messages == [{"role": "assistant", "content": "x好"}]


# ----------------------------------------------------------------------------------------------------------
# The tool-use task's data (data_process.py tools)


def test_tool_task_holds_out_arith_test_and_never_trains_on_a_tool_result(tmp_path, tiny_tokenizer):
    import data_process
    import rewards
    from support.data import task_data
    from train_helpers import write_jsonl

    chat = write_jsonl(tmp_path / "chat.jsonl", [{"conversations": d} for d in data_process.read_dialogues()[:40]])
    held = write_jsonl(tmp_path / "held.jsonl", [{"conversations": [{"role": "user", "content": "好评\n正面还是负面?"},
                                                                    {"role": "assistant", "content": "正面"}],
                                                  "label": "正面"}])
    sizes = dict(sft_size=60, rl_size=20, test_size=20)
    arith = task_data.build_arith(str(tmp_path / "arith"), **sizes)
    data_process.main(["tools", "--out_dir", str(tmp_path), "--tool_share", "0.5", "--chat_share", "0.25",
                       "--chat_data", str(chat), "--chat_test", str(held), *(f"--{k}={v}" for k, v in sizes.items())])
    read = lambda name: [json.loads(line) for line in (tmp_path / name).read_text(encoding="utf-8").splitlines()]
    sft, think = read("tools_sft_train.jsonl"), read("tools_think_sft_train.jsonl")
    arith_test = [json.loads(line) for line in Path(list(arith)[2]).read_text(encoding="utf-8").splitlines()]
    assert read("tools_test.jsonl") == arith_test and len(read("tools_rl_train.jsonl")) == 20
    assert read("tools_chat_test.jsonl") == [{"prompt": "好评\n正面还是负面?", "answer": "正面"}]
    test_prompts = {r["prompt"] for r in arith_test}
    trained = {r["messages"][0]["content"] for r in sft} | {r["prompt"] for r in read("tools_rl_train.jsonl")}
    assert len(test_prompts) == 20 and not test_prompts & trained
    assert all(r["tools"] == [CALCULATOR_SCHEMA] for r in sft + think) and len(sft) == len(think) == 80

    calling = [r["messages"] for r in sft if len(r["messages"]) == 4]
    problems = {json.loads(line)["conversations"][0]["content"]
                for line in Path(list(arith)[0]).read_text(encoding="utf-8").splitlines()}
    chats = [r["messages"] for r in sft if r["messages"][0]["content"] not in problems]
    assert 15 <= len(calling) <= 45 and len(chats) == 20 and all("tool_calls" not in m for c in chats for m in c)
    for user, call_turn, result, answer in calling:
        expression = call_turn["tool_calls"][0]["function"]["arguments"]["expression"]
        assert result["content"] == tools_file.calculator(expression) and result["tool_call_id"] == "call_0"
        assert rewards.exact_answer([answer["content"]], answer=[result["content"]]) == [1.0]
        ids, mask = encode_chat(tiny_tokenizer, [user, call_turn, result, answer], tools=[CALCULATOR_SCHEMA])
        learned = tiny_tokenizer.decode([i for i, m in zip(ids, mask) if m])
        assert learned == (f'<tool_call>{{"name": "calculator", "arguments": {{"expression": "{expression}"}}}}'
                           f'</tool_call><|im_end|>{answer["content"]}<|im_end|>')  # never the result or the schema
    for plain, thought in zip(sft, think):
        if len(plain["messages"]) == 2 and ";" in plain["messages"][1]["content"]:  # answered with the working
            working, final = plain["messages"][1]["content"].rsplit(";", 1)
            assert thought["messages"][1] == {"role": "assistant", "reasoning_content": working, "content": final}
        else:
            assert all(m.get("reasoning_content") == "" for m in thought["messages"] if m["role"] == "assistant")
    with pytest.raises(SystemExit, match=f"error: {tmp_path / 'none.jsonl'}: no such file"):
        data_process.main(["tools", "--out_dir", str(tmp_path), "--chat_data", str(tmp_path / "none.jsonl")])


# ----------------------------------------------------------------------------------------------------------
# A tiny model that calls the calculator: what model_sample's and GRPO's tool tests run


def tool_tokenizer(root: Path, texts: list[str]) -> str:
    """A tiny tokenizer that has also seen the tools system turn (the template's text with calculator's schema)
    many times, so that turn takes ~170 tokens, not ~550: the tool tests' sequences stay short."""
    import train_tokenizer
    from transformers import AutoTokenizer

    from dataset import render_chat

    plain = str(root / "plain_tokenizer")
    train_tokenizer.save_tokenizer(train_tokenizer.build_tokenizer(iter(texts[:50]), vocab_size=300), plain)
    system = render_chat(AutoTokenizer.from_pretrained(plain), [{"role": "user", "content": "x"}], False,
                         load_tools("tools.py").schemas, None)[0]
    path = str(root / "tool_tokenizer")
    train_tokenizer.save_tokenizer(train_tokenizer.build_tokenizer(iter(texts + [system] * 300), vocab_size=1000), path)
    return path


def arith_call(a: int, b: int) -> list[dict]:
    """a加b等于多少? answered with the calculator, as data_process.py tools writes it."""
    return [{"role": "user", "content": f"{a}加{b}等于多少?"},
            {"role": "assistant", "content": "", "tool_calls": [call(f"{a}+{b}", "call_0")]},
            {"role": "tool", "tool_call_id": "call_0", "content": str(a + b)},
            {"role": "assistant", "content": f"{a}+{b}={a + b}"}]


def tool_calling_model(root: Path, tokenizer_dir: str, steps: int = 80) -> str:
    """A checkpoint of a tiny model (dim 32) that has learnt one tool conversation by heart (arith_call(12, 5)):
    sampled at temperature 1 it mostly calls the calculator, sometimes wrongly, and answers."""
    import torch
    from transformers import AutoTokenizer

    from k_model import ModelConfig, Transformer
    from support.loading.checkpoint import config_to_dict, save_checkpoint
    from support.loading.sources import tokenizer_fingerprint

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=len(tok), max_seq_len=320)
    model = Transformer(config)
    ids, mask = encode_chat(tok, arith_call(12, 5), tools=load_tools("tools.py").schemas)
    x, y, m = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]]), torch.tensor([mask[1:]], dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = (model(x, y, loss_mask=m).last_loss.view_as(m) * m).sum() / m.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path = root / "tool_model" / "ckpt.pt"
    save_checkpoint(path, {"model": model.state_dict(), "model_config": config_to_dict(config), "step": 0,
                           "vocab_size": len(tok), "tokenizer_fingerprint": tokenizer_fingerprint(tok),
                           "args": {"tokenizer_path": tokenizer_dir}})
    return str(path.parent)


@pytest.fixture(scope="module")
def tool_model(tmp_path_factory, tiny_texts, one_thread):
    root = tmp_path_factory.mktemp("tool_model")
    return tool_calling_model(root, tool_tokenizer(root, tiny_texts))


def test_model_sample_runs_the_calls_and_shows_them_in_batch_and_chat(tool_model, capsys):
    """Greedy, the model calls calculator("12+5"), reads 17 and answers; in chat the next turn sees the calls and
    results as history (the conversation goes on)."""
    import io

    import model_sample

    flags = ["--model", tool_model, "--tools", "tools.py", "--temperature", "0", "--max_new_tokens", "64",
             "--device", "cpu", "--dtype", "float32"]
    model_sample.main(flags + ["--prompt", "12加5等于多少?"])
    assert capsys.readouterr().out == ('user> 12加5等于多少?\nassistant> call> calculator({"expression": "12+5"})\n'
                                       'tool> 17\nassistant> 12+5=17\n')
    args = model_sample.parse_args(flags + ["--chat"])
    gen = model_sample.TextGenerator(tool_model, device="cpu", dtype="float32")
    out = io.StringIO()
    model_sample.chat_repl(gen, args, stdin=io.StringIO("12加5等于多少?\n12加5等于多少?\n"), stdout=out,
                           tools=load_tools("tools.py"))
    replies = [line for line in out.getvalue().splitlines() if line.startswith(("assistant>", "call>", "tool>"))]
    assert replies[:3] == ['assistant> call> calculator({"expression": "12+5"})', "tool> 17", "assistant> 12+5=17"]
    assert len(replies) > 3  # a second reply, after the first exchange's five messages
    with pytest.raises(SystemExit, match="--tools needs a chat model"):
        model_sample.main(flags + ["--mode", "pretrain"])
