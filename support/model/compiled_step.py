"""Transformer.decode_step through torch.compile (the gpt-fast approach): the machinery behind
Transformer.compile_decode.

Shapes stay put from token to token (the KV cache is pre-allocated and written in place, positions and the
cache slot are tensors), so one graph serves every step.
"""

from __future__ import annotations

import sys
import time
import types
from typing import NamedTuple

import torch
import torch.nn.functional as F


class GraphKey(NamedTuple):
    """Which compiled graph a step runs in. batch_size None stands for every batch larger than 1: on a CPU the
    shapes are symbolic, one graph serves them all (a size of 1 is still specialised: batch 1 has its own)."""
    batch_size: int | None
    device: str
    dtype: torch.dtype

    def batch_text(self) -> str:
        return "> 1" if self.batch_size is None else str(self.batch_size)


class CompiledStep:
    """model.decode_step through torch.compile, called like it.
    On CUDA each step is replayed as a CUDA graph (mode "reduce-overhead"), which needs fixed shapes: one
    graph per batch size, attention reading the whole window with the unfilled slots masked (untested: no
    GPU was at hand).
    On a CPU the shapes are symbolic (one graph for batch 1, one for every larger batch) and attention reads
    the filled slots only. Inductor fuses the norms, rotary embeddings and activations around the matmuls;
    attention is written as products and sums it fuses too (k_model.one_token_attention). At batch 1 each
    float32 product is one loop of inductor's (cpu_matmul.one_row_product), at larger batches the model's
    packed oneDNN product (cpu_matmul.Linear). Either way the graph reads the weights at run time: new
    weights need no new graph.
    The first step of each graph compiles, and says so on stderr with the seconds it took; if compiling
    fails, one line says why and the model decodes eagerly from then on."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        # CUDA graphs replay fixed shapes: every step attends to the whole window
        self.fixed_shapes = model.device.type == "cuda"
        # the eager step with a code object of its own: dynamo keeps its graphs per code object and, after a
        # few, stops compiling it; a model's graphs must not use up another model's share
        eager_step = type(model)._eager_step
        step = types.MethodType(types.FunctionType(eager_step.__code__.replace(), eager_step.__globals__), model)
        if self.fixed_shapes:
            self.fn = torch.compile(step, fullgraph=True, dynamic=False, mode="reduce-overhead")
        else:
            self.fn = torch.compile(step, fullgraph=True, dynamic=True)
        self.compiled: set[GraphKey] = set()
        self.max_batch: int | None = None  # set once warmed up for a server: a larger batch is refused

    def batches_to_trace(self, max_batch: int) -> list[int]:
        """Batch sizes whose steps build every graph that batches of 1..max_batch rows use."""
        return list(range(1, max_batch + 1)) if self.fixed_shapes else [1, 2][:max_batch]

    def pin(self, caches: list) -> None:
        """A CUDA graph writes the caches in place: it may keep their addresses instead of copying them."""
        if self.fixed_shapes:
            for c in caches:
                torch._dynamo.mark_static_address(c.k)
                torch._dynamo.mark_static_address(c.v)

    def run(self, *args) -> torch.Tensor:
        # No duck shaping: by default sizes that happen to be equal while tracing share one symbol (a first
        # step's 2 attended slots and 2 kv heads, or batch 4 and 4 slots), and the graph is compiled again
        # as soon as they differ. Read while tracing, so it is set around every call.
        with torch.fx.experimental._config.patch(use_duck_shape=False):
            return self.fn(*args)

    def __call__(self, tok, pos, slot, attend, caches) -> torch.Tensor:
        if self.fn is None:  # compiling failed: eager from then on
            return self.model._eager_step(tok, pos, slot, attend, caches)
        if self.fixed_shapes:  # attend to the whole window, unfilled slots masked
            attend = F.pad(attend, (0, self.model.context_len - attend.shape[1]), value=False)
        B = tok.shape[0]
        if self.max_batch is not None and B > self.max_batch:  # a new graph would compile while clients wait
            raise RuntimeError(f"the compiled step was traced for batches up to {self.max_batch}, got {B} rows")
        graph = GraphKey(B if self.fixed_shapes or B == 1 else None, tok.device.type, caches[0].k.dtype)
        if graph in self.compiled:
            return self.run(tok, pos, slot, attend, caches)
        began = time.perf_counter()
        try:
            logits = self.run(tok, pos, slot, attend, caches)
        except Exception as err:  # compiling failed before anything ran, so the eager step starts clean
            say_compile_failed(err)
            self.fn = self.model._compiled_step = None
            return self.model._eager_step(tok, pos, slot, attend, caches)
        self.compiled.add(graph)
        print(f"fast decode: compiled the one-token step for batch {graph.batch_text()} ({graph.device}, "
              f"{graph.dtype}) in {time.perf_counter() - began:.1f} s", file=sys.stderr)
        return logits


def compile_step(model: torch.nn.Module) -> CompiledStep | None:
    """model's decode step compiled, or None (and one line saying why) where torch.compile itself refuses."""
    try:
        return CompiledStep(model)
    except Exception as err:  # torch.compile refuses where dynamo is unsupported (e.g. a new Python)
        say_compile_failed(err)
        return None


def say_compile_failed(err: Exception) -> None:
    reason = (str(err).strip().splitlines() or [""])[0][:200]
    print(f"fast decode: torch.compile failed ({type(err).__name__}: {reason}); decoding eagerly", file=sys.stderr)
