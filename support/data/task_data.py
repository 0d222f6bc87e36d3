"""Task data with checkable answers, built by `data_process.py` subcommands: arithmetic word problems and GSM8K
prompts for RL (ddp_grpo.py, SFT on part of the arithmetic first), and the JSONL files of eval_model.py's offline
tasks (eval_tasks/*.yaml), made from the held-out splits of the embedded corpus.

    python data_process.py arith          # out/data/arith_{sft_train,rl_train,test}.jsonl
    python data_process.py tools          # out/data/tools_*.jsonl: the same problems with a calculator tool
    python data_process.py gsm8k          # out/data/gsm8k_{train,test}.jsonl (downloaded: network needed)
    python data_process.py eval_tasks     # out/data/eval/*.jsonl from sft_test.jsonl and pretrain_val.jsonl
"""
from __future__ import annotations

import os
import random
import re
import sys
from typing import Iterable, Iterator

from dataset import JsonlRecords, write_jsonl

LABELS = {"pos": "正面", "neg": "负面"}  # the sentiment task's two answers, in the order of its choices

# Arithmetic in words: a task with verifiable answers for RL (ddp_grpo.py), SFT on part of it first.

# (template, operation): two- and three-digit addition / subtraction posed in a sentence; the reply works the
# columns, then states "a+b=c" (rewards.exact_answer reads the number after the last "=")
ARITH_TEMPLATES = (
    ("{a}加{b}等于多少?", "+"), ("{a}减{b}等于多少?", "-"),
    ("小明有{a}个苹果,又买了{b}个,现在一共有多少个?", "+"), ("书架上有{a}本书,借走了{b}本,还剩多少本?", "-"),
    ("仓库里有{a}箱货物,又运来{b}箱,共有多少箱?", "+"), ("车上有{a}人,下车{b}人,车上还有多少人?", "-"),
)


def arith_problem(rng: random.Random, three_digit_share: float) -> tuple[int, str, int]:
    """(a, op, b) with a, b of two digits, or of three with probability three_digit_share each; a subtraction
    never goes below zero."""
    a, b = (rng.randint(100, 999) if rng.random() < three_digit_share else rng.randint(10, 99) for _ in range(2))
    op = rng.choice("+-")
    return (max(a, b), op, min(a, b)) if op == "-" else (a, op, b)


def arith_records(problems: list[tuple[int, str, int]], rng: random.Random) -> list[dict]:
    """{"prompt", "answer", "reply"} for each problem, in one of its operation's sentence templates."""
    records = []
    for a, op, b in problems:
        template = rng.choice([t for t, o in ARITH_TEMPLATES if o == op])
        answer = a + b if op == "+" else a - b
        records.append({"prompt": template.format(a=a, b=b), "answer": str(answer),
                        "reply": f"{arith_columns(a, op, b)};{a}{op}{b}={answer}"})
    return records


def arith_columns(a: int, op: str, b: int) -> str:
    """The column working, units first, as a pupil writes it: '7+8=15;3+4+1=8' for 37+48 (the +1 a carry),
    '12-5=7;8-6-1=1' for 82-65 (12: the units borrowed a ten, the -1 pays it back). A small model that must
    write 85 at once has to do the carry in its head and rarely learns to; one column at a time it does."""
    columns, carry = [], 0
    top, bottom = str(a)[::-1], str(b)[::-1].ljust(len(str(a)), "0") if op == "-" else str(b)[::-1]
    for i in range(max(len(top), len(bottom))):
        t, u = int(top[i]) if i < len(top) else 0, int(bottom[i]) if i < len(bottom) else 0
        if op == "+":
            total = t + u + carry
            columns.append(f"{t}+{u}{'+1' if carry else ''}={total}")
            carry = total // 10
        else:
            borrow = int(t - carry < u)
            columns.append(f"{t + 10 * borrow}-{u}{'-1' if carry else ''}={t + 10 * borrow - u - carry}")
            carry = borrow
    return ";".join(columns)


def arith_splits(sft_size: int, rl_size: int, test_size: int, seed: int, three_digit_share: float
                 ) -> tuple[list[dict], list[dict], list[dict]]:
    """(test, sft, rl) arith_records of different problems (a + b and b + a count as one), the same for the same
    arguments: `arith` and `tools` hold out the same test problems."""
    if not 0 <= three_digit_share <= 1:
        raise ValueError(f"--three_digit_share {three_digit_share}: must be between 0 and 1")
    rng = random.Random(seed)
    problems: dict[tuple, tuple[int, str, int]] = {}
    total = sft_size + rl_size + test_size
    distinct = 8_190 if three_digit_share == 0 else 150_000  # two-digit problems: 4,095 sums and 4,095 differences
    if total > distinct:
        raise ValueError(f"--sft_size + --rl_size + --test_size = {total:,}: there are not that many distinct problems")
    while len(problems) < total:
        a, op, b = arith_problem(rng, three_digit_share)
        problems.setdefault((op, *sorted((a, b))) if op == "+" else (op, a, b), (a, op, b))
    records = arith_records(list(problems.values()), rng)
    return records[:test_size], records[test_size : test_size + sft_size], records[test_size + sft_size :]


def prompt_answer(records: list[dict]) -> list[dict]:
    return [{"prompt": r["prompt"], "answer": r["answer"]} for r in records]


def build_arith(out_dir: str = "out/data", sft_size: int = 2000, rl_size: int = 2000, test_size: int = 500,
                seed: int = 1234, three_digit_share: float = 0.2, think: bool = False) -> dict[str, tuple[int, int]]:
    """arith_sft_train.jsonl (conversations), arith_rl_train.jsonl and arith_test.jsonl ({"prompt", "answer"}).
    The three splits hold different problems: test problems are never seen.
    Two-digit problems dominate by default (three_digit_share 0.2 per operand): a small model learns them
    well enough to be sometimes right, which is what RL needs to have something to reinforce.
    think: arith_think_sft_train.jsonl instead, the column working as reasoning_content (<think>) and the answer
    alone as content: the same problems and tokens of working, for comparing the two at equal steps."""
    test, sft, rl = arith_splits(sft_size, rl_size, test_size, seed, three_digit_share)
    conversations = [{"conversations": tool_conversation(r, use_tool=False, think=think)} for r in sft]
    files = {f"arith{'_think' if think else ''}_sft_train.jsonl": conversations,
             "arith_rl_train.jsonl": prompt_answer(rl), "arith_test.jsonl": prompt_answer(test)}
    return {os.path.join(out_dir, name): write_jsonl(os.path.join(out_dir, name), recs) for name, recs in files.items()}


# ---------------------------------------------------------------------------------------------------------
# Tool use: the arithmetic problems answered with a calculator tool (tools.py), mixed with chat that needs none.

def calculator_call(expression: str) -> dict:
    return {"id": "call_0", "type": "function", "function": {"name": "calculator", "arguments": {"expression": expression}}}


def tool_conversation(record: dict, use_tool: bool, think: bool) -> list[dict]:
    """An arith record as OpenAI messages. With the tool: the assistant calls calculator("37+48"), reads the result
    in a tool message and answers "37+48=85" (the final form rewards.exact_answer reads); without: it answers with
    the column working. think: the working goes into reasoning_content and the answer alone into content; a reply
    with nothing to work out (a call, the answer after the result) gets an empty think block, as Qwen3 renders
    replies in thinking mode, so a thinking model always opens with one."""
    working, final = record["reply"].rsplit(";", 1)
    expression, answer = final.split("=")
    user = {"role": "user", "content": record["prompt"]}
    empty = {"reasoning_content": ""} if think else {}
    if use_tool:
        return [user, {"role": "assistant", "content": "", **empty, "tool_calls": [calculator_call(expression)]},
                {"role": "tool", "tool_call_id": "call_0", "content": answer},
                {"role": "assistant", "content": final, **empty}]
    if think:
        return [user, {"role": "assistant", "reasoning_content": working, "content": final}]
    return [user, {"role": "assistant", "content": record["reply"]}]


def chat_records(path: str, n: int, rng: random.Random) -> list[list[dict]]:
    """n conversations drawn from an SFT file of `data_process.py embedded` (dialogues and review turns)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file (`python data_process.py` writes it; or pass --chat_share 0)")
    conversations = [r["conversations"] for _, _, r in JsonlRecords(path, "conversations")]
    return rng.sample(conversations, min(n, len(conversations)))


def build_tools(calculator_schema: dict, out_dir: str = "out/data", sft_size: int = 2000, rl_size: int = 2000,
                test_size: int = 500, seed: int = 1234, three_digit_share: float = 0.2, tool_share: float = 1.0,
                chat_share: float = 0.3, chat_path: str = "out/data/sft_train.jsonl",
                chat_test_path: str = "out/data/sft_test.jsonl") -> dict[str, tuple[int, int]]:
    """The tool-use task on the problems of build_arith (the same seed and sizes: the same held-out test):
    tools_sft_train.jsonl ({"messages", "tools"}: tool_share of the arithmetic answered with the calculator, the
    rest with the column working; chat_share of the file ordinary turns of chat_path with the tool offered and no
    call), tools_think_sft_train.jsonl (the same records with reasoning_content: tool_conversation),
    tools_rl_train.jsonl and tools_test.jsonl ({"prompt", "answer"}), and with chat, tools_chat_test.jsonl: the
    held-out review prompts of chat_test_path ({"prompt", "answer"}), to count calls where none is needed."""
    if not 0 <= tool_share <= 1:
        raise ValueError(f"--tool_share {tool_share}: must be between 0 and 1")
    if not 0 <= chat_share < 1:
        raise ValueError(f"--chat_share {chat_share}: must be at least 0 and below 1")
    test, sft, rl = arith_splits(sft_size, rl_size, test_size, seed, three_digit_share)
    rng = random.Random(seed + 1)  # arith_splits's own draws stay as `arith` makes them
    uses = [rng.random() < tool_share for _ in sft]
    chats = chat_records(chat_path, round(len(sft) * chat_share / (1 - chat_share)), rng) if chat_share else []
    order = list(range(len(sft) + len(chats)))
    rng.shuffle(order)
    tools = [calculator_schema]

    def sft_file(think: bool) -> list[dict]:
        arith = [tool_conversation(r, use, think) for r, use in zip(sft, uses)]
        chat = [[{**m, "reasoning_content": ""} if think and m["role"] == "assistant" else m for m in c] for c in chats]
        return [{"messages": (arith + chat)[i], "tools": tools} for i in order]

    files = {"tools_sft_train.jsonl": sft_file(think=False), "tools_think_sft_train.jsonl": sft_file(think=True),
             "tools_rl_train.jsonl": prompt_answer(rl), "tools_test.jsonl": prompt_answer(test)}
    if chat_share:
        files["tools_chat_test.jsonl"] = [{"prompt": r["conversations"][0]["content"], "answer": r.get("label", "")}
                                          for _, _, r in JsonlRecords(chat_test_path, "conversations")]
    return {os.path.join(out_dir, name): write_jsonl(os.path.join(out_dir, name), recs) for name, recs in files.items()}


# ---------------------------------------------------------------------------------------------------------
# Offline evaluation tasks (eval_tasks/*.yaml, run by eval_model.py through lm-evaluation-harness), built from
# the held-out splits of `data_process.py embedded` so that no training file contains them.

EVAL_DIR = "out/data/eval"  # where eval_tasks/*.yaml read their data (relative to the working directory)
_SENTENCE = re.compile(r"[^。！？!?\n]+[。！？!?]")
CLOZE_CONTEXT_CHARS = 60  # a cloze context is the end of one sentence ...
CLOZE_ENDING_CHARS = 24  # ... and the choices are this many characters of the next one or of other articles'


def sentiment_task_docs(test_path: str) -> Iterator[dict]:
    """sft_test.jsonl as task documents: the user message, its label and the label's index in LABELS."""
    choices = list(LABELS.values())
    for _, _, record in JsonlRecords(test_path, "conversations"):
        label = record.get("label")
        if label not in choices:
            raise ValueError(f"{test_path}: a record's \"label\" is {label!r}, not one of {choices}")
        yield {"prompt": record["conversations"][0]["content"], "label": label, "gold": choices.index(label)}


def cloze_task_docs(articles: list[str], per_article: int, choices: int, rng: random.Random) -> list[dict]:
    """HellaSwag-style items from held-out articles: the context is one sentence, the choices the opening of
    the next sentence and of sentences of other articles, all cut to the same length (so acc and acc_norm
    compare endings of equal size)."""
    sentences = [[s for s in _SENTENCE.findall(a) if len(s) >= CLOZE_ENDING_CHARS] for a in articles]
    docs = []
    for i, own in enumerate(sentences):
        others = [s for j, ss in enumerate(sentences) if j != i for s in ss]
        for k in range(min(per_article, len(own) - 1)):
            endings = [own[k + 1]] + rng.sample(others, choices - 1)
            endings = [e[:CLOZE_ENDING_CHARS] for e in endings]
            order = list(range(choices))
            rng.shuffle(order)
            docs.append({"context": own[k][-CLOZE_CONTEXT_CHARS:], "endings": [endings[j] for j in order],
                         "gold": order.index(0)})
    return docs


def build_eval_tasks(data_dir: str = "out/data", out_dir: str = EVAL_DIR, cloze_per_article: int = 3,
                     cloze_choices: int = 4, seed: int = 1234) -> dict[str, tuple[int, int]]:
    """The JSONL files of eval_tasks/*.yaml from sft_test.jsonl (held-out reviews) and pretrain_val.jsonl
    (held-out People's Daily articles); return {file: (records, chars)}."""
    articles = [r["text"] for _, _, r in JsonlRecords(os.path.join(data_dir, "pretrain_val.jsonl"), "text")]
    files = {
        "sentiment.jsonl": sentiment_task_docs(os.path.join(data_dir, "sft_test.jsonl")),
        "news_cloze.jsonl": cloze_task_docs(articles, cloze_per_article, cloze_choices, random.Random(seed)),
        "news.jsonl": ({"text": a} for a in articles),
    }
    return {name: write_jsonl(os.path.join(out_dir, name), recs) for name, recs in files.items()}


# ---------------------------------------------------------------------------------------------------------
# GSM8K: grade-school word problems (downloaded), for ddp_grpo.py.

GSM8K = ("openai/gsm8k", "main")  # the public name, as lm-eval's gsm8k task loads it


def gsm8k_records(rows: Iterable[dict], where: str) -> Iterator[dict]:
    """GSM8K rows {question, answer} as ddp_grpo.py prompts: {"prompt": question, "answer": answer}; the answer
    keeps its worked solution, whose '#### N' rewards.exact_answer reads."""
    for i, row in enumerate(rows):
        if not isinstance(row.get("question"), str) or "####" not in str(row.get("answer", "")):
            raise ValueError(f"{where}: row {i} is not a GSM8K row (a 'question' and an answer ending '#### N')")
        yield {"prompt": row["question"], "answer": row["answer"]}


def build_gsm8k(out_dir: str) -> dict[str, tuple[int, int]]:
    """Fetch GSM8K (datasets, from the hub: network needed) -> gsm8k_train.jsonl / gsm8k_test.jsonl prompts."""
    from datasets import load_dataset

    try:
        splits = load_dataset(*GSM8K)
    except ConnectionError as e:  # the hub is unreachable: say so in one line, not datasets' traceback
        sys.exit(f"error: {e}; GSM8K is downloaded, so this command needs the network")
    paths = {split: os.path.join(out_dir, f"gsm8k_{split}.jsonl") for split in ("train", "test")}
    return {path: write_jsonl(path, gsm8k_records(splits[split], f"{GSM8K[0]} {split}"))
            for split, path in paths.items()}
