"""The argument parser every script uses: argparse's, plus a hint where a flag belongs to another script.

The same flag means the same thing everywhere: --model (any model source open_model opens), --tokenizer_path,
--device, --dtype, --out_dir. A flag a script does not take is most often one meant for its neighbour
(--pretrain_path for serve.py, --tasks for a trainer), so the error says which script takes it.
"""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from types import ModuleType
from typing import NoReturn

# flag -> the scripts that take it (and the flag meant here, where there is one)
HOMES = {
    "--model": "model_sample.py, serve.py, eval_model.py and export_gguf.py (a training run starts from --init_from)",
    "--init_from": "the training scripts ddp_*.py (elsewhere the model is --model)",
    "--pretrain_path": "model_sample.py (the original design's name; --model is the same in every script)",
    "--sft_path": "model_sample.py (the original design's name; --model is the same in every script)",
    "--mode": "model_sample.py",
    "--tasks": "eval_model.py (a training run evaluates with --eval_tasks)",
    "--eval_tasks": "the training scripts ddp_*.py (eval_model.py takes --tasks)",
    "--out_dir": "the training scripts ddp_*.py (eval_model.py writes to --output_path)",
    "--output_path": "eval_model.py (a training run writes to --out_dir)",
    "--resume": "the training scripts ddp_*.py",
    "--host": "serve.py", "--port": "serve.py", "--max_batch": "serve.py", "--api_key": "serve.py",
    "--chat": "model_sample.py", "--prompt": "model_sample.py", "--stream": "model_sample.py",
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose "unrecognized arguments" error names the script each flag belongs to."""

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments:"):
            flags = [word.split("=", 1)[0] for word in message.split(":", 1)[1].split() if word.startswith("--")]
            hints = [f"{flag} is a flag of {HOMES[flag]}" for flag in flags if flag in HOMES]
            if hints:
                message += f" ({'; '.join(hints)}; see {self.prog} --help)"
        super().error(message)


def import_user_file(file: str, label: str) -> ModuleType:
    """The Python file a flag names (a reward file, a tools file), imported as a module of its own; a missing
    file is FileNotFoundError, and any error while importing it is one ValueError line, never a traceback
    through ours: "{label}: {file}: ...". """
    path = Path(file)
    if not path.is_file():
        raise FileNotFoundError(f"{label}: {file}: no such file")
    spec = importlib.util.spec_from_file_location(f"_user_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # the user's file: any error in it is theirs to fix, told in one line
        raise ValueError(f"{label}: importing {file} failed: {type(e).__name__}: {e}") from None
    return module
