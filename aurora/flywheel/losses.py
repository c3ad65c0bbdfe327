"""Training losses of the flywheel (each switchable and weighted in TrainerConfig).

p: the target's stored top-k distribution, scattered onto the draft vocabulary (mass on
tokens outside it is dropped); q: the draft's distribution over its vocabulary.
* imitation      — forward KL(p || q) (as cross-entropy -sum p log q) on chain rows;
* discard        — at a rejected proposal x, a hinge in log space, max(0, log q(x) - log p(x)),
                   weighted by (1 - p(x)/q(x))+ (the probability speculative sampling rejects
                   x); its gradient on x's logit is weight * (1 - q(x)), not the vanishing
                   q(x)(1 - q(x)) of the probability-space hinge max(0, q(x) - p(x));
* counterfactual — KL(p || q) at rejected nodes (the target's view under the rejected prefix);
* accept_len     — minus the expected accepted length of a chain, sum_k prod_{i<=k} alpha_i,
                   alpha_i = sum_v min(p_i(v), q_i(v)) (`acceptance`).
"""
from __future__ import annotations

import torch


def dense_targets(ids: torch.Tensor, probs: torch.Tensor, t2d: torch.Tensor, draft_vocab: int) -> torch.Tensor:
    """ids, probs: [D, K] target top-k; t2d: [V] target id -> draft id or -1 -> p [D, Vd]."""
    d = t2d[ids.clamp(min=0)]
    keep = (ids >= 0) & (d >= 0)
    p = torch.zeros(ids.shape[0], draft_vocab, device=probs.device)
    p.scatter_add_(1, d.clamp(min=0), probs * keep)
    return p


def cross_entropy(p: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """p: [N, Vd] target mass on draft ids; logq: [N, Vd] draft log-probs -> [N]."""
    return -(p * logq).sum(-1)


def discard(logq: torch.Tensor, p: torch.Tensor, tok: torch.Tensor, floor: float = 1e-6) -> torch.Tensor:
    """Log-space hinge at rejected draft ids x: w * max(0, log q(x) - log p(x)), with
    w = (1 - p(x)/q(x))+ the rejection probability (detached). d/dlogit_x = w * (1 - q(x)):
    it does not vanish when q(x) is small. logq, p: [N, Vd]; tok: [N] -> [N]."""
    logq_x = logq.gather(1, tok[:, None])[:, 0]
    p_x = p.gather(1, tok[:, None])[:, 0]
    weight = (1 - p_x / logq_x.exp().clamp(min=1e-12)).clamp(min=0).detach()
    return weight * (logq_x - torch.log(p_x.clamp(min=floor))).clamp(min=0)


def hinge(q: torch.Tensor, p: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
    """The old probability-space hinge max(0, q(x) - p(x)) (kept for the A/B): [N]."""
    qx = q.gather(1, tok[:, None])[:, 0]
    px = p.gather(1, tok[:, None])[:, 0]
    return torch.clamp(qx - px, min=0.0)


def acceptance(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """alpha = sum_v min(p, q): the probability a speculative sample is accepted. [N]"""
    return torch.minimum(p, q).sum(-1)
