"""The docs stay usable: every relative link and #anchor in README.md and docs/*.md resolves, by GitHub's own
rules for heading anchors, and every command README.md quotes (its stage table and its bash blocks) is one
the script accepts, read by the script's own argparse parser in this process (no subprocess, nothing run)."""
from __future__ import annotations

import argparse
import collections
import importlib
import re
import shlex
import sys
from pathlib import Path
from types import ModuleType

import pytest

from support.training.train_task import Task
from support.training.train_flags import build_parser as training_parser
from train_helpers import ROOT

README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]

FENCED_BLOCK = re.compile(r"^(`{3,}|~{3,})(\w*)[^\n]*\n(.*?)^\1[ \t]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)
LINK_TARGET = re.compile(r"\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")  # [text](target "title"), ![alt](target)
HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$", re.M)
URL_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)


def prose(markdown: str) -> str:
    """The markdown with its fenced code blocks removed: their # lines are comments, their links examples."""
    return FENCED_BLOCK.sub("", markdown)


def heading_slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text (code spans keep their content, links their text),
    lowercased, every character but letters, digits, '_', '-' and spaces removed, each space a '-'."""
    text = CODE_SPAN.sub(lambda m: m.group(2).strip(), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # [text](url) -> text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading's anchor on the page; a repeated one gets -1, -2, ... as GitHub numbers them."""
    seen: collections.Counter[str] = collections.Counter()
    found = set()
    for heading in HEADING.findall(prose(page.read_text(encoding="utf-8"))):
        slug = base = heading_slug(heading)
        while slug in found:
            seen[base] += 1
            slug = f"{base}-{seen[base]}"
        found.add(slug)
    return found


def link_targets(page: Path) -> list[str]:
    """The targets of the page's links and images, outside code blocks and code spans."""
    text = CODE_SPAN.sub("code", prose(page.read_text(encoding="utf-8")))
    return LINK_TARGET.findall(text)


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in link_targets(page):
        if URL_SCHEME.match(target):
            continue  # http(s), mailto: not ours to check offline
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            broken.append(f"{target}: no heading there has the anchor #{anchor}")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(page):
    assert broken_links(page) == [], f"{page.relative_to(ROOT)}: broken links"


def test_heading_slugs_follow_githubs_rules():
    # headings of these pages and their anchors by GitHub's rules (the old README linked the 2nd and 4th so)
    assert heading_slug("Beyond one GPU: FSDP2 (`--parallel fsdp`)") == "beyond-one-gpu-fsdp2---parallel-fsdp"
    assert heading_slug("Scaling up: seq-monkey + BelleGroup, the 215M model, GPUs") == \
        "scaling-up-seq-monkey--bellegroup-the-215m-model-gpus"
    assert heading_slug("Measured: DPO after the demo's SFT model") == "measured-dpo-after-the-demos-sft-model"
    assert heading_slug("Time to quality: `python bench/bench_speedrun.py`") == \
        "time-to-quality-python-benchbench_speedrunpy"
    assert heading_slug("See [the model](docs/model.md) 中文") == "see-the-model-中文"


def test_repeated_headings_are_numbered_and_code_blocks_hold_no_headings_or_links(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Bad input\n\n## Bad input\n\n```bash\n# not a heading\n[x](missing.md)\n```\n"
                    "`[y](missing.md)` [z](page.md#bad-input-1)\n", encoding="utf-8")
    assert anchors(page) == {"bad-input", "bad-input-1"}
    assert broken_links(page) == []
    page.write_text("[a](page.md#bad-input-2) [b](gone.md)\n# Bad input\n", encoding="utf-8")
    assert [b.split(":")[0] for b in broken_links(page)] == ["page.md#bad-input-2", "gone.md"]


# --- the commands README.md quotes -------------------------------------------------------------------------

def readme_commands() -> list[str]:
    """The commands README quotes in its text and tables (code spans that start with python / torchrun / bash:
    the stage table's) and in its bash blocks (continuation lines joined), each cut at '&&' into single ones."""
    text = README.read_text(encoding="utf-8")
    quoted = [span for _, span in CODE_SPAN.findall(prose(text)) if re.match(r"(python|torchrun|bash) ", span)]
    for _, lang, body in FENCED_BLOCK.findall(text):
        if lang == "bash":
            quoted += body.replace("\\\n", " ").splitlines()
    commands = []
    for line in quoted:
        words = shlex.split(line, comments=True)
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            commands.append(shlex.join(words[:cut]))
            words = words[cut + 1:]
    return list(dict.fromkeys(commands))  # each once


def script_and_args(command: str) -> tuple[str, list[str]] | None:
    """(script, its arguments) of `python X.py ...`, `torchrun [its flags] X.py ...` or `bash demo.sh ...`;
    None for other programs (pip, python -m pytest)."""
    words = shlex.split(command)
    if words[0] in ("python", "torchrun", "bash"):
        for i, word in enumerate(words[1:], 1):
            if word.endswith((".py", ".sh")):
                return word, words[i + 1:]
            if words[0] != "torchrun":
                return None  # python -m ...: not one of our scripts
    return None


class Parsed(Exception):
    """Raised in place of the rest of a script's main once its own parser has read the arguments."""


def parse_like_main(module: ModuleType, args: list[str], monkeypatch) -> argparse.Namespace:
    """For a script that builds its parser inside main(): run main only as far as its parse_args."""
    parse_args = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        raise Parsed(parse_args(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
    monkeypatch.setattr(sys, "argv", [module.__file__, *args])
    try:
        module.main()
    except Parsed as parsed:
        return parsed.args[0]
    raise AssertionError(f"{module.__file__}: main() returned without parsing its arguments")


def parse_script_args(script: str, args: list[str], monkeypatch) -> argparse.Namespace:
    """Parse args with the script's own parser: build_parser(), the training flags of its Task, or the parser
    its main() builds. argparse exits (status 2, the message on stderr) on a flag the script does not have."""
    path = ROOT / script
    monkeypatch.syspath_prepend(str(path.parent))  # as `python bench/x.py` puts bench/ first (bench's common.py)
    module = importlib.import_module(path.stem)
    tasks = [v for v in vars(module).values()
             if isinstance(v, type) and issubclass(v, Task) and v.__module__ == module.__name__]
    if tasks:
        return training_parser(tasks[0]()).parse_args(args)
    if hasattr(module, "build_parser"):
        return module.build_parser().parse_args(args)
    return parse_like_main(module, args, monkeypatch)


def demo_sh_accepts(args: list[str]) -> None:
    options = re.findall(r"^\s*(--[\w-]+)\)", (ROOT / "demo.sh").read_text(encoding="utf-8"), re.M)
    assert set(args) <= set(options), f"demo.sh takes {options}, not {sorted(set(args) - set(options))}"


def check_command(command: str, monkeypatch, capsys) -> None:
    found = script_and_args(command)
    assert found, f"{command!r}: not a python / torchrun / bash command of this repo's scripts"
    script, args = found
    assert (ROOT / script).is_file(), f"{command!r}: no script {script}"
    if script.endswith(".sh"):
        return demo_sh_accepts(args)
    try:
        parse_script_args(script, args, monkeypatch)
    except SystemExit as e:
        if e.code:
            error = capsys.readouterr().err.strip().splitlines()[-1]  # argparse: usage lines, then the error
            pytest.fail(f"{command!r}: {script} refuses its arguments: {error}")


COMMANDS = readme_commands()


def test_readme_quotes_the_commands_of_every_stage():
    scripts = {found[0] for found in map(script_and_args, COMMANDS) if found}
    assert {"data_process.py", "train_tokenizer.py", "ddp_pretrain.py", "ddp_sft_full.py", "ddp_dpo.py",
            "ddp_grpo.py", "model_sample.py", "eval_model.py", "serve.py", "demo.sh"} <= scripts


@pytest.mark.parametrize("command", [c for c in COMMANDS if script_and_args(c)])
def test_readme_command_parses_with_its_scripts_own_parser(command, monkeypatch, capsys):
    check_command(command, monkeypatch, capsys)


def test_a_misspelled_flag_or_subcommand_fails(monkeypatch, capsys):
    for command in ["python ddp_pretrain.py --lerning_rate 1e-3", "python data_process.py pretokenise",
                    "python serve.py --max-batch 4", "python bench/bench_model.py --rouns 3",
                    "torchrun --nproc_per_node=2 ddp_sft_full.py --lora-r 8", "bash demo.sh --small"]:
        with pytest.raises((pytest.fail.Exception, AssertionError)):
            check_command(command, monkeypatch, capsys)
