"""Training losses of the flywheel (each switchable and weighted in TrainerConfig).

p: target distribution (from stored last hidden states through the frozen target LM
head, restricted to the draft vocabulary); q: the draft's distribution.
* imitation  — forward KL(p || q) (as cross-entropy) on accepted positions;
* discard    — at a rejected proposal x: max(0, q(x) - p(x)) at its parent, plus
               KL(p || q) at the rejected node itself (the counterfactual prefix);
* accept_len — minus the expected accepted length of a chain, sum_k prod_{i<=k} alpha_i,
               alpha_i = sum_v min(p_i(v), q_i(v)) (`acceptance`; chained in Trainer._chain_tau).
"""
from __future__ import annotations

import torch


def cross_entropy(p: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """p: [N, Vd] target mass on draft ids; logq: [N, Vd] draft log-probs -> [N]."""
    return -(p * logq).sum(-1)


def discard_excess(q: torch.Tensor, p: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
    """max(0, q(x) - p(x)) for rejected draft ids x: q, p [N, Vd], tok [N] -> [N]."""
    qx = q.gather(1, tok[:, None])[:, 0]
    px = p.gather(1, tok[:, None])[:, 0]
    return torch.clamp(qx - px, min=0.0)


def acceptance(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """alpha = sum_v min(p, q): the probability a speculative sample is accepted. [N]"""
    return torch.minimum(p, q).sum(-1)
