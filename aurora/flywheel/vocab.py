"""Draft vocabulary and draft LM-head initialisation from the target.

`init_from_target`: the draft's LM head rows are the target's rows for the draft
vocabulary (`d2t`) and its final norm is the target's, so a fresh draft starts speaking
the target's output space instead of random logits. `VocabCounter`/`remap_head`: the
draft vocabulary is rebuilt online from the most frequent target tokens seen in traffic;
rebuilding re-maps the trainer's rows (kept tokens keep their rows; new tokens take the
target's row when a source is given, else zeros). The serving slot is untouched until the
next published swap, which carries the new `d2t` map with the weights.
"""
from __future__ import annotations

from collections import Counter

import torch


def target_norm_weight(runner) -> torch.Tensor | None:
    """The target's final RMSNorm scale (as a plain multiplier), or None if not found."""
    inner = getattr(runner.model, "model", runner.model)
    norm = getattr(inner, "norm", None)
    w = getattr(norm, "weight", None)
    if w is None:
        return None
    w = w.detach().float()
    return w + 1 if "gemma" in type(norm).__name__.lower() else w   # Gemma scales by (1 + w)


@torch.no_grad()
def init_from_target(head, runner) -> None:
    """Copy the target's LM-head rows (chosen by head.d2t) and final norm into the draft head."""
    src = runner.lm_head.weight                                      # [V, hidden]
    if src.shape[1] != head.lm_head.weight.shape[1]:
        raise ValueError("draft and target hidden sizes differ; cannot initialise from the target")
    head.lm_head.weight.copy_(src[head.d2t.to(src.device)].to(head.lm_head.weight))
    w = target_norm_weight(runner)
    if w is not None and w.shape == head.norm.weight.shape:
        head.norm.weight.copy_(w.to(head.norm.weight))


class VocabCounter:
    def __init__(self, vocab_size: int):
        self.counts = Counter()
        self.vocab_size = vocab_size

    def update(self, token_ids: list[int]) -> None:
        self.counts.update(token_ids)

    def top(self, k: int, current: torch.Tensor) -> torch.Tensor:
        """k target ids: seen tokens by frequency, then the current map's order as filler."""
        chosen = [t for t, _ in self.counts.most_common(k)]
        seen = set(chosen)
        for t in current.tolist():
            if len(chosen) >= k:
                break
            if t not in seen:
                chosen.append(t)
                seen.add(t)
        return torch.tensor(sorted(chosen), dtype=torch.long)


@torch.no_grad()
def remap_head(head, new_d2t: torch.Tensor, source: torch.Tensor | None = None) -> float:
    """Re-index head.lm_head rows to `new_d2t`; new rows from `source` [V, hidden] (the
    target's LM head) or zeros. Returns the fraction of rows kept."""
    old = head.d2t.tolist()
    pos = {t: i for i, t in enumerate(old)}
    weight = head.lm_head.weight
    new_ids = new_d2t.tolist()
    if source is not None:
        new_w = source[new_d2t.to(source.device)].to(weight)
    else:
        new_w = torch.zeros_like(weight)
    kept = 0
    for i, t in enumerate(new_ids):
        j = pos.get(t)
        if j is not None:
            new_w[i] = weight[j]
            kept += 1
    weight.copy_(new_w)
    head.d2t.copy_(new_d2t.to(head.d2t.device))
    return kept / len(new_ids)
