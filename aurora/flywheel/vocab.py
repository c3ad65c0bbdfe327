"""Draft vocabulary built online: the most frequent target tokens seen in traffic.

Rebuilding re-maps the trainer's LM-head rows (kept tokens keep their rows, new tokens
start at zero logits); the serving slot is untouched until the next published swap,
which carries the new `d2t` map with the weights, so a draft in use is never corrupted.
"""
from __future__ import annotations

from collections import Counter

import torch


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
def remap_head(head, new_d2t: torch.Tensor) -> float:
    """Re-index head.lm_head rows to `new_d2t`; returns the fraction of rows kept."""
    old = head.d2t.tolist()
    pos = {t: i for i, t in enumerate(old)}
    weight = head.lm_head.weight
    new_w = torch.zeros_like(weight)
    kept = 0
    for i, t in enumerate(new_d2t.tolist()):
        j = pos.get(t)
        if j is not None:
            new_w[i] = weight[j]
            kept += 1
    weight.copy_(new_w)
    head.d2t.copy_(new_d2t.to(head.d2t.device))
    return kept / len(new_d2t)
