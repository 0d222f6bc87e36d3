"""Batched rollout generation for RL and on-policy distillation (ddp_grpo.py, ddp_distill.py): many prompts
continued together through the KV cache, each row sampling from its own seeded generator, so that a row's tokens
do not depend on the batch it is in (a resumed run, or one with another process count, samples the same)."""
from __future__ import annotations

import torch

from k_model import Transformer


def completion_seed(seed: int, step: int, index: int, k: int, round_: int = 0) -> int:
    """The seed of completion k of prompt `index` at `step`; round_ > 0: of its generation after round_ rounds of
    tool calls (a tuple of ints hashes the same in every process)."""
    first = (((seed * 1_000_003 + step) * 1_000_000_007 + index) * 1_009 + k) % 2**63
    return first if round_ == 0 else hash((first, round_)) % 2**63


@torch.inference_mode()
def sample_completions(model: Transformer, prompts: list[list[int]], max_new_tokens: int, eos_id: int,
                       pad_id: int, temperature: float = 0.0,
                       generators: list[torch.Generator] | None = None) -> list[list[int]]:
    """Each prompt's completion ids (ending with EOS unless cut at max_new_tokens), decoded together through
    the KV cache (k_model's new_caches / prefill / decode_step), prompts left-padded. temperature 0 is greedy;
    otherwise row i draws from generators[i] (Gumbel-max: argmax(logits / T + Gumbel noise) samples the softmax),
    so a row's tokens do not depend on the other rows of the batch."""
    device, rows = model.device, len(prompts)
    width = max(map(len, prompts))
    tokens = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    real = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device, dtype=torch.bool)
    new = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long)
    done = torch.zeros(rows, dtype=torch.bool)
    with model.packed_weights():
        caches = model.new_caches(rows, device)
        logits, pos, key_mask = model.prefill(tokens, real, caches)
        slot = torch.tensor([width], device=device)
        for t in range(max_new_tokens):
            if temperature == 0:
                tok = logits.argmax(-1).cpu()
            else:
                gumbel = torch.stack([-torch.empty(logits.shape[-1]).exponential_(generator=g).log()
                                      for g in generators])
                tok = (logits.float().cpu() / temperature + gumbel).argmax(-1)
            new[:, t] = torch.where(done, pad_id, tok)
            done |= tok == eos_id
            if bool(done.all()) or t + 1 == max_new_tokens:
                break
            key_mask[:, width + t] = True
            logits = model.decode_step(tok.to(device), pos, slot, key_mask[:, : width + t + 1], caches)
            pos += 1
            slot += 1
    completions = []
    for row in new.tolist():
        end = row.index(eos_id) + 1 if eos_id in row else max_new_tokens
        completions.append(row[:end])
    return completions
