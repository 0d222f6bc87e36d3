"""Sample from, chat with and evaluate a trained model.

    python model_sample.py                                   # SFT answers to a few built-in prompts (out/sft)
    python model_sample.py --mode pretrain --prompt "北京" --num_samples 3 --stream   # continue text (out/pretrain)
    python model_sample.py --prompt "你好" --temperature 0   # one SFT answer, greedy
    python model_sample.py --chat                            # multi-turn chat; /reset clears it, /exit quits
    python model_sample.py --eval        # val perplexity (out/pretrain) and sentiment accuracy (out/sft)
    python model_sample.py --model out/sft/hf --prompt "你好"   # an HF export works too (its own tokenizer)
    python model_sample.py --model out/sft/adapter           # a LoRA adapter (peft format) on its base model
    python model_sample.py --tools tools.py --prompt "37加48等于多少?"   # the model may call tools.py's functions
    python model_sample.py --tools tools.py --chat           # chat with tools: each call and result is shown

--model names the model for every mode, as in serve.py and eval_model.py; the original design's
--pretrain_path / --sft_path (the defaults out/pretrain, out/sft) still work. A model path may be a ckpt.pt
(a LoRA run's too: its base with the adapters), a run directory (its ckpt.pt,
else its hf/ export), an HF model directory (any LlamaForCausalLM) or a peft adapter directory. The tokenizer
is --tokenizer_path, else the one saved with the model (a checkpoint's: the one it was trained with), else
out/tokenizer; a model whose vocabulary differs from it is refused.

--tools FILE.py offers the file's functions to the model (their JSON schemas in the system turn): a reply's tool
calls run, their results go back as tool turns and the model goes on, up to --max_tool_rounds rounds of calls
(support/inference/tool_loop.py); the calls, results and answer are printed as `call>`, `tool>` and
`assistant>` lines. --max_new_tokens then bounds the whole exchange, the tool turns included.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TextIO

import torch

from dataset import JsonlRecords
from support.cli import ArgumentParser
from support.inference.text_generator import DEFAULT_CONTEXT_LEN, TextGenerator, build_messages
from support.inference.tool_loop import Generate, Tools, load_tools, run_tool_loop
from support.loading.sources import DTYPES

DEFAULT_PRETRAIN_PROMPTS = ["中国", "北京", "今天"]
DEFAULT_SFT_PROMPTS = [
    "你好",
    "房间很干净,服务也很周到,下次还会再来。\n这条评论的情感是正面还是负面?",
    "质量太差了,用了两天就坏了,不推荐。\n这条评论的情感是正面还是负面?",
]


def sentiment_accuracy(gen: TextGenerator, test_path: str, batch_size: int = 64,
                       limit: int | None = None) -> dict[str, Any]:
    """Accuracy of the model's greedy answer on a held-out split ({"conversations", "label"} lines: the
    messages before the last one are the prompt, "label" the gold answer); an answer that is not exactly
    one of the labels counts as wrong."""
    records = [r for _, _, r in JsonlRecords(test_path, "conversations")][:limit]
    missing = [i + 1 for i, r in enumerate(records) if "label" not in r]
    if missing:
        raise ValueError(f"{test_path}:{missing[0]}: missing key \"label\" (the gold answer)")
    labels = sorted({r["label"] for r in records})
    prompts = [r["conversations"][:-1] for r in records]
    replies = gen.classify(prompts, labels, batch_size)
    correct = sum(reply == r["label"] for reply, r in zip(replies, records))
    majority = max(sum(r["label"] == lab for r in records) for lab in labels)
    return {"accuracy": correct / len(records), "correct": correct, "total": len(records),
            "majority_baseline": majority / len(records),
            "invalid": sum(reply not in labels for reply in replies)}


# ----------------------------------------------------------------------------------------------------------
# Command line


def one_at_a_time(gen: TextGenerator, args: argparse.Namespace) -> Generate:
    """The tool loop's generate: each prompt's reply alone, with the sampling flags, ending with EOS where the
    model ended it (k_model.generate keeps the stop token)."""
    @torch.inference_mode()
    def generate(rows: list[int], prompts: list[list[int]], max_new_tokens: int, round_: int) -> list[list[int]]:
        return [gen.model.generate(torch.tensor([p], device=gen.device), max_new_tokens, args.temperature, args.top_k,
                                   args.top_p, stop_id=gen.eos_id)[0].tolist() for p in prompts]

    return generate


def tool_exchange(gen: TextGenerator, args: argparse.Namespace, tools: Tools, messages: list[dict],
                  stdout: TextIO) -> list[dict]:
    """The model's replies to `messages` with the tools (the loop: calls, results, the answer), printed one line
    a turn after the "assistant> " already printed; returns the new messages (OpenAI's shape)."""
    ids = gen.chat_ids(messages, tools.schemas)
    (t,) = run_tool_loop(one_at_a_time(gen, args), [ids], gen.tokenizer, tools, args.max_new_tokens,
                         args.max_tool_rounds)
    lines = []
    for m in t.messages:
        if m["role"] == "tool":
            lines.append(f"tool> {m['content']}")
            continue
        if m.get("reasoning_content"):
            lines.append(f"assistant> <think>{m['reasoning_content']}</think>")
        if m["content"] or not m.get("tool_calls"):
            lines.append(f"assistant> {m['content']}")
        lines += [f"call> {c['function']['name']}({c['function']['arguments']})" for c in m.get("tool_calls", [])]
    print("\n".join(lines).removeprefix("assistant> "), file=stdout, flush=True)
    return t.messages


def chat_repl(gen: TextGenerator, args: argparse.Namespace, stdin: TextIO = sys.stdin,
              stdout: TextIO = sys.stdout, tools: Tools | None = None) -> None:
    """Multi-turn chat on stdin/stdout. /reset forgets the conversation, /exit (or end of input) quits."""
    print(f"chat with {gen.info['source']} (/reset clears the history, /exit quits)", file=stdout, flush=True)
    history: list[dict[str, str]] = []
    while True:
        print("user> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if line and not stdin.isatty():
            print(line.rstrip("\n"), file=stdout)  # a terminal echoes what is typed; a pipe does not
        if not line or line.strip() == "/exit":
            print(file=stdout)
            return
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            history = []
            print("(history cleared)", file=stdout, flush=True)
            continue
        messages = gen.trim_history(build_messages(text, args.system_prompt, history), args.max_new_tokens)
        print("assistant> ", end="", file=stdout, flush=True)
        if tools is not None:
            history = [m for m in messages if m["role"] != "system"] + tool_exchange(gen, args, tools, messages, stdout)
            continue
        reply = ""
        for piece in gen.sft_stream(messages, args.max_new_tokens, args.temperature, args.top_k, args.top_p):
            reply += piece
            if args.stream:
                print(piece, end="", file=stdout, flush=True)
        print("" if args.stream else reply, file=stdout, flush=True)
        history = [m for m in messages if m["role"] != "system"] + [{"role": "assistant", "content": reply}]


def run_samples(gen: TextGenerator, args: argparse.Namespace, tools: Tools | None = None) -> None:
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p)
    prompts = args.prompt or (DEFAULT_PRETRAIN_PROMPTS if args.mode == "pretrain" else DEFAULT_SFT_PROMPTS)
    for prompt in prompts:
        for k in range(args.num_samples):
            if args.mode == "pretrain":
                header = f"--- sample {k + 1}: " if args.num_samples > 1 else "--- "
                print(f"{header}{prompt}", end="", flush=True)
                if args.stream:
                    for piece in gen.pretrain_stream(prompt, **sampling):
                        print(piece, end="", flush=True)
                    print()
                else:
                    print(gen.pretrain_sample(prompt, 1, **sampling)[0][len(prompt):])
            else:
                print(f"user> {prompt}\nassistant> ", end="", flush=True)
                if tools is not None:
                    tool_exchange(gen, args, tools, build_messages(prompt, args.system_prompt), sys.stdout)
                elif args.stream:
                    messages = build_messages(prompt, args.system_prompt)
                    for piece in gen.sft_stream(messages, **sampling):
                        print(piece, end="", flush=True)
                    print()
                else:
                    print(gen.sft_sample(prompt, args.system_prompt, **sampling))


def run_eval(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    pre = TextGenerator(args.pretrain_path, args.tokenizer_path, args.device, args.dtype)
    ppl, tokens = pre.perplexity(args.val_data_path, args.eval_batch_size)
    results["val_perplexity"] = {"model": pre.info["source"], "data": args.val_data_path, "perplexity": ppl,
                                 "tokens": tokens}
    print(f"val perplexity: {ppl:.2f} ({pre.info['source']} on {args.val_data_path}, {tokens:,} tokens "
          f"in windows of {pre.context_len})", flush=True)
    del pre
    sft = TextGenerator(args.sft_path, args.tokenizer_path, args.device, args.dtype)
    acc = sentiment_accuracy(sft, args.test_data_path, args.eval_batch_size, args.eval_limit)
    results["sentiment"] = {"model": sft.info["source"], "data": args.test_data_path, **acc}
    print(f"sentiment accuracy: {acc['accuracy']:.1%} ({acc['correct']}/{acc['total']} on {args.test_data_path}; "
          f"majority class {acc['majority_baseline']:.1%}; {acc['invalid']} answers were neither label)", flush=True)
    if args.eval_out:
        Path(args.eval_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.eval_out).write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return results


def add_context_shift_flags(p: argparse.ArgumentParser) -> None:
    """--context_shift, --context_keep and --context_len (serve.py has them too): the inference window and going
    on past it."""
    p.add_argument("--context_shift", type=int, default=None,
                   help="past the context window, drop this many of the oldest tokens at a time and go on with the "
                        "KV cache (default: half of the window minus --context_keep)")
    p.add_argument("--context_keep", type=int, default=0,
                   help="tokens at the start (e.g. a system prompt) that a context shift never drops")
    p.add_argument("--context_len", type=int, default=DEFAULT_CONTEXT_LEN,
                   help="the context window: the model's max_seq_len, at most this many tokens (each row's KV "
                        "cache holds this many; 0: no limit)")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="the model, in every mode (--eval too): a ckpt.pt, run dir, HF export, LoRA adapter dir, "
                        "ckpt_dcp or any HF Llama; replaces --pretrain_path and --sft_path")
    p.add_argument("--mode", choices=["pretrain", "sft"], default="sft",
                   help="pretrain: continue text with --pretrain_path; sft: answer prompts with --sft_path")
    p.add_argument("--pretrain_path", default="out/pretrain", help="pretrained model (ckpt.pt, run dir or HF export)")
    p.add_argument("--sft_path", default="out/sft", help="SFT model (ckpt.pt, run dir or HF export)")
    p.add_argument("--tokenizer_path", default=None,
                   help="tokenizer dir (default: the HF export's own, else out/tokenizer)")
    p.add_argument("--prompt", action="append", help="prompt (repeatable); default: a few built-in ones")
    p.add_argument("--system_prompt", default=None, help="system message before the conversation (sft, chat)")
    p.add_argument("--num_samples", type=int, default=1, help="samples per prompt")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--top_p", type=float, default=0.9)
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--tools", default=None, help="FILE.py whose functions the model may call (tools.py: a calculator); "
                   "sft mode and --chat")
    p.add_argument("--max_tool_rounds", type=int, default=3, help="rounds of tool calls per answer at most")
    add_context_shift_flags(p)
    p.add_argument("--chat", action="store_true", help="interactive multi-turn chat with the SFT model")
    p.add_argument("--no_compile", action="store_true",
                   help="--chat compiles its one-token decode step once (tens of seconds on a CPU, then faster "
                        "replies; eager if compiling fails); this keeps it eager")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="auto = bfloat16 on CUDA and on CPUs with native bf16, else float32")
    g = p.add_argument_group("evaluation (--eval)")
    g.add_argument("--eval", action="store_true",
                   help="val perplexity of --pretrain_path and sentiment accuracy of --sft_path")
    g.add_argument("--val_data_path", default="out/data/pretrain_val.bin", help="pretokenized held-out text")
    g.add_argument("--test_data_path", default="out/data/sft_test.jsonl", help="held-out sentiment split")
    g.add_argument("--eval_batch_size", type=int, default=64)
    g.add_argument("--eval_limit", type=int, default=None, help="score only the first N test records")
    g.add_argument("--eval_out", default=None, help="also write the results as JSON here")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, --model standing for --pretrain_path and --sft_path where it is given."""
    args = build_parser().parse_args(argv)
    if args.model is not None:
        args.pretrain_path = args.sft_path = args.model
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    try:
        if args.eval:
            run_eval(args)
            return
        path = args.pretrain_path if args.mode == "pretrain" else args.sft_path
        if args.tools and args.mode == "pretrain":
            raise ValueError("--tools needs a chat model: --mode sft or --chat")
        tools = load_tools(args.tools) if args.tools else None
        gen = TextGenerator(path, args.tokenizer_path, args.device, args.dtype, args.context_shift, args.context_keep,
                            args.context_len)
        if args.chat:
            if not args.no_compile:  # a session generates many replies: compiling pays off
                gen.compile_decode()
            chat_repl(gen, args, tools=tools)
        else:
            run_samples(gen, args, tools)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
