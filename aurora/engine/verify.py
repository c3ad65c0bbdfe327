"""Tree verification: which drafted nodes the target accepts, and the bonus token.

Vocabulary: *proposed* nodes come from the draft; *accepted* nodes form one root-to-node
path; the *bonus* token is drawn from the target after the last accepted node (on a
rejection it is the *recovered* token, drawn from the residual distribution).
Greedy: follow children equal to the target argmax. Sampling: recursive rejection
sampling over siblings (SpecInfer): child j drawn from q_j is accepted with prob
min(1, r(x)/q_j(x)); on rejection the residual r <- norm(max(r - q_j, 0)). Lossless.
"""
from __future__ import annotations

import torch

from aurora.engine.sampling import sample
from aurora.engine.tree import DraftTree


def verify_greedy(tree: DraftTree, argmax: list[int]) -> tuple[list[int], int]:
    """argmax[0] is the target's choice after the root, argmax[1 + i] after node i."""
    path, node = [], -1
    while True:
        want = argmax[node + 1]
        child = tree.find_child(node, want)
        if child < 0:
            return path, want
        path.append(child)
        node = child


def verify_sampling(tree: DraftTree,
                    target_probs,                   # [1 + N, V] processed p at root and each node
                                                    # (a tensor, or LazyProbs: rows computed when read)
                    generator: torch.Generator) -> tuple[list[int], int]:
    """The residual is copied only when a child is rejected (an accepted level allocates nothing);
    a deterministic proposal (point mass at x) makes the residual r with r(x) zeroed, renormalised."""
    path, node = [], -1
    support = getattr(target_probs, "support", None)
    while True:
        residual = target_probs[node + 1]           # r: target distribution at this node (a view)
        owned = False
        accepted = -1
        for child in tree.children(node):
            x = tree.token_ids[child]
            row = tree.q_rows[child]
            q = tree.q_probs[row] if row >= 0 else None   # q_j: the processed draft distribution, or a point mass
            qx = float(q[x]) if q is not None else 1.0
            rx = float(residual[x])
            u = float(torch.rand((), generator=generator))
            if qx > 0 and u * qx < rx:             # accept w.p. min(1, r(x) / q(x))
                accepted = child
                break
            if q is None:                          # max(r - 1[x], 0) = r with r(x) = 0
                if not owned:
                    residual, owned = residual.clone(), True
                residual[x] = 0.0
            elif owned:
                residual.sub_(q).clamp_(min=0.0)
            else:
                residual, owned = (residual - q).clamp_(min=0.0), True
            total = float(residual.sum())
            if total <= 0:                         # r == q exactly; cannot happen after a rejection
                residual, owned = target_probs[node + 1], False
            else:
                residual /= total
        if accepted < 0:                           # residual <= the row: zero outside its support
            return path, sample(residual, generator, support(node + 1) if support else None)
        path.append(accepted)
        node = accepted
