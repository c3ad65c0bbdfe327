"""Processed distributions and sampling.

`processed_probs` turns logits into exactly the distribution a token is drawn from
(temperature, then top-k, then top-p). Verification must use these same processed
distributions for both target (p) and draft (q); mixing raw and processed is a bug.
Top-p never sorts the vocabulary: the nucleus is found among the top few candidates
(`topk`), widening only for rows whose nucleus is not inside them (flat distributions).

A truncated distribution (top-k, or a top-p nucleus inside the top `SPARSE_CANDIDATES`) is
computed on its candidates only: with z = logits / T and the candidates' z sorted,
p_i = exp(z_i - logsumexp(z)) (top-k: softmax over the k candidates), the nucleus cut is the
smallest p_i with sum_{j<i} p_j < top_p, and p is renormalised over the kept candidates. That is
the full-vocabulary computation restricted to the tokens it can keep, provided no token left
out ties one kept (checked per row; such rows, and nuclei wider than the candidates, take the
full-vocabulary path). Its support (the kept ids) lets `draw` search a few entries instead of a
cumulative sum over the vocabulary; the token a given u maps to is the same.
"""
from __future__ import annotations

import torch

from aurora.types import SamplingParams

NUCLEUS_CANDIDATES = (64, 1024)     # top-p looks for its cut among this many, widening in turn
SPARSE_CANDIDATES = NUCLEUS_CANDIDATES[0]


def processed_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[N, V] logits -> [N, V] float32 probabilities actually sampled from (temperature > 0)."""
    return processed(logits, params)[0]


def processed(logits: torch.Tensor,           # [N, V]
              params: SamplingParams,
              with_support: bool = False) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """(`processed_probs`, support of each row if asked: the ascending ids that can have nonzero
    probability, or None for a row computed over the full vocabulary)."""
    z = logits.to(torch.float32, copy=True).div_(params.temperature)   # [N, V], our own buffer
    truncated = _truncated(z, params)
    if truncated is None:
        return _full(z, params), [None] * z.shape[0]
    ids, probs, ok = truncated                                         # [N, K], [N, K], [N]
    rest = (~ok).nonzero().squeeze(-1)
    dense = _full(z[rest], params) if rest.numel() else None           # before z is overwritten
    out = z.zero_().scatter_(-1, ids, probs)
    if dense is not None:
        out[rest] = dense
    support: list[torch.Tensor | None] = [None] * z.shape[0]
    if with_support:
        keep = probs > 0
        for i in ok.nonzero().squeeze(-1).tolist():
            support[i] = ids[i][keep[i]].sort().values
    return out, support


def _truncated(z: torch.Tensor, params: SamplingParams):
    """(ids [N, K], renormalised probabilities [N, K] (0 where cut), rows computed exactly
    [N] bool) over the top K candidates, or None where nothing truncates the vocabulary."""
    vocab = z.shape[-1]
    top_k = params.top_k if params.top_k and params.top_k < vocab else 0
    if not top_k and params.top_p >= 1.0:
        return None
    k = top_k or SPARSE_CANDIDATES
    if k >= vocab:
        return None
    top = torch.topk(z, k + 1, dim=-1)                                   # sorted, descending
    vals, ids, left_out = top.values[:, :k], top.indices[:, :k], top.values[:, k]
    if top_k:
        ok = left_out < vals[:, -1]              # the full path keeps every logit tied with the k-th
        probs = torch.softmax(vals, dim=-1)                              # [N, k]
    else:
        lse = torch.logsumexp(z, dim=-1, keepdim=True)                   # [N, 1]
        probs = (vals - lse).exp_()                                      # full-softmax p of the candidates
        p_left_out = (left_out - lse[:, 0]).exp_()
    if params.top_p < 1.0:
        mass_before = probs.cumsum(-1) - probs
        num_keep = (mass_before < params.top_p).sum(-1, keepdim=True)   # [N, 1] >= 1
        cut = probs.gather(-1, num_keep - 1)                             # [N, 1]
        if not top_k:                            # resolved inside the candidates, no tie left out
            ok = (num_keep[:, 0] < k) & (p_left_out < cut[:, 0])
        probs = probs.masked_fill_(probs < cut, 0.0)
    probs = probs.div_(probs.sum(-1, keepdim=True))
    return ids, probs, ok


def _full(z: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The full-vocabulary path on tempered logits z [N, V] (overwritten). Two [N, V] buffers,
    the rest in place: every vocabulary-wide temporary is a fresh allocation per step
    (measured: 64 rows 24 -> 13 ms with top-p)."""
    probs = z
    vocab = probs.shape[-1]
    top_k = params.top_k if params.top_k and params.top_k < vocab else 0
    if top_k:
        kth = torch.topk(probs, top_k, dim=-1).values[..., -1:]
        probs.masked_fill_(probs < kth, float("-inf"))
    probs = torch.softmax(probs, dim=-1)
    if params.top_p < 1.0:
        cut = nucleus_cut(probs, params.top_p, top_k)                     # [N, 1]
        probs.masked_fill_(probs < cut, 0.0)
        probs.div_(probs.sum(-1, keepdim=True))
    return probs


class LazyProbs:
    """`processed_probs` of each row of a [N, V] logits block, computed on first access. Sampled
    verification reads the root's row and then only the rows of nodes it accepts, so a tree of
    many nodes costs the distributions of its accepted path, not one per node (a vocabulary-wide
    row costs ~0.3 ms on this CPU, as much as verifying ~10 more nodes in the forward)."""

    def __init__(self, logits: torch.Tensor, params: SamplingParams, root=None):
        self.logits, self.params = logits, params               # logits: [N, V]
        self._rows: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        if root is not None:                                    # row 0, computed with other rows (`roots`)
            self._rows[0] = root

    @staticmethod
    def roots(logits: torch.Tensor,                             # [R, V]
              rows: list[int], params: SamplingParams) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Row 0 of several sequences' blocks (every sampled verification reads its root) in one
        call, to pass as `root=`: the candidate ops cost ~0.65 ms for one row and ~0.25 ms per
        row for four (their fixed per-op cost is shared)."""
        probs, support = processed(logits[rows], params, with_support=True)
        return [(probs[i].cpu(), None if support[i] is None else support[i].cpu()) for i in range(len(rows))]

    def __len__(self) -> int:
        return self.logits.shape[0]

    def _row(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        row = self._rows.get(i)
        if row is None:
            probs, support = processed(self.logits[i:i + 1], self.params, with_support=True)
            row = self._rows[i] = (probs[0].cpu(), None if support[0] is None else support[0].cpu())
        return row

    def __getitem__(self, i: int) -> torch.Tensor:              # [V] float32 on CPU
        return self._row(i)[0]

    def support(self, i: int) -> torch.Tensor | None:           # [n] ascending ids, or None (all)
        """Ids outside which row i (and every residual derived from it) is zero."""
        return self._row(i)[1]

    @property
    def num_computed(self) -> int:
        return len(self._rows)


def nucleus_cut(probs: torch.Tensor,        # [N, V] normalised
                top_p: float, support: int = 0) -> torch.Tensor:   # [N, 1]
    """Smallest probability kept by top-p: the nucleus is the shortest prefix of tokens in
    decreasing probability whose mass reaches `top_p` (tokens tied with its last one are kept
    too, so the rule does not depend on how a sort orders ties). `support` > 0: at most that
    many nonzero entries (after top-k), so that many candidates always suffice."""
    vocab = probs.shape[-1]
    sizes = [min(k, vocab) for k in NUCLEUS_CANDIDATES if k < vocab] + [vocab]
    if support:
        sizes = [min(support, vocab)]
    cut = torch.empty(probs.shape[0], 1, dtype=probs.dtype, device=probs.device)
    todo = torch.arange(probs.shape[0], device=probs.device)             # rows still unresolved
    for k in sizes:
        rows = probs if todo.numel() == probs.shape[0] else probs[todo]  # no copy on the first pass
        top = torch.topk(rows, k, dim=-1).values if k < vocab else rows.sort(-1, descending=True).values
        mass_before = top.cumsum(-1) - top                               # [n, k]
        num_keep = (mass_before < top_p).sum(-1, keepdim=True)           # [n, 1] >= 1
        # resolved: the prefix reaches top_p inside the k candidates (or k covers the support)
        done = (num_keep < k).squeeze(-1) | (k == vocab) | (k == sizes[-1])
        cut[todo[done]] = top[done].gather(-1, num_keep[done] - 1)
        todo = todo[~done]
        if todo.numel() == 0:
            break
    return cut


def sample(probs: torch.Tensor, generator: torch.Generator | None,
           support: torch.Tensor | None = None) -> int:
    """Draw one token id from a [V] distribution (zero outside `support`, if given)."""
    return int(draw(probs, generator, support=support)[0])


def draw(probs: torch.Tensor,                 # [V] nonnegative, need not be normalised
         generator: torch.Generator | None,
         n: int = 1,
         support: torch.Tensor | None = None) -> torch.Tensor:   # [n] int64, i.i.d. draws (with replacement)
    """Inverse-CDF sampling: token i is drawn iff C[i-1] <= u * C[V-1] < C[i], C = cumsum(probs),
    u ~ U[0, 1) in float64, so P(i) = probs[i] / sum(probs) and a zero-probability token is never
    drawn (C[i] = C[i-1]). A cumsum and a binary search: ~17x cheaper than torch.multinomial over
    a 49k vocabulary on this CPU (1 ms per row), which made sampled serving slower than greedy.
    `support`: ascending ids outside which probs is zero; C is then summed over those entries
    only, and u maps to the same token (a zero adds nothing to C)."""
    if support is not None:
        return support[draw(probs[support], generator, n)]
    cdf = probs.double().cumsum(-1)                                       # [V]
    total = cdf[-1]
    if not bool(torch.isfinite(total)) or float(total) <= 0 or bool(probs.min() < 0):
        raise ValueError("invalid probability distribution: it holds inf, nan, negative "
                         "values or sums to zero")
    u = torch.rand(n, generator=generator, dtype=torch.float64).to(probs.device) * total
    u = torch.minimum(u, torch.nextafter(total, total.new_zeros(())))    # u < total after rounding
    return torch.searchsorted(cdf, u, right=True)


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,))))
    return g
