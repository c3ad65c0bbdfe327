"""Online cost model of a target step, learned from the engine's own timings.

A decode step over B sequences verifying N draft nodes in total runs T = B + N tokens;
its time is modelled as t(T) = a + b*T (weights streamed once per step: a; per-token
compute: b), fitted by least squares with exponential forgetting over recent decode steps,
so it follows the batch size, context length and machine load it actually sees. The
draft's cost per proposing sequence is an exponential average of measured proposal times.

The line is only a summary: on a CPU a GEMM over a few rows costs about what one row costs
(weights are streamed once and the kernels block rows), then cost grows per row block, so a
step's time is flat, then steps up (`examples/spec_costs.py`: beta(1..4) ~1.07, beta(16) ~1.5
on a 2-core AVX-512 CPU, bf16). `curve` is therefore measured too: a decayed mean step time
per row-count bucket (exact up to 8 rows, then four buckets per doubling), shrunk toward the
line with `prior_weight` pseudo-observations, trusted less as it ages (its weight decays with
every step of any size), made non-decreasing by isotonic regression over the buckets,
interpolated between measured buckets, the line outside them. The adaptive policy reads the curve.
Its buckets are total rows, whatever the batch: one sequence with three draft nodes and four
plain sequences share the 4-row bucket although attention over four contexts costs more, so the
adaptive policy keeps one model per batch-size bucket besides the one over all steps and reads
the batch's own once it has evidence (`AdaptivePolicy.step_costs`).
"""
from __future__ import annotations

import math

BUCKET_DECAY = 0.9        # a bucket's own observations: mean over about the last ten
AGE_DECAY = 0.995         # a bucket's weight per step observed anywhere (stale buckets fall back to the line)


def row_bucket(num_tokens: int) -> int:
    """Upper end of the row-count bucket of T: T itself up to 8, then 10, 12, 14, 16, 20, 24, ..."""
    t = max(1, int(num_tokens))
    if t <= 8:
        return t
    step = 1 << (int(math.log2(t - 1)) - 2)
    return -(-t // step) * step


def monotone_fit(cells: list[tuple[int, float, float]]) -> list[tuple[int, float]]:
    """Weighted isotonic regression (pool adjacent violators) of (x, y, weight) sorted by x:
    the non-decreasing y closest in weighted squares. A noisy high bucket is averaged with its
    neighbours instead of lifting every larger one (as a running maximum would)."""
    blocks: list[list[float]] = []                         # [weighted sum, weight, count]
    for _, y, w in cells:
        blocks.append([y * w, w, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s, w2, n = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += w2
            blocks[-1][2] += n
    ys = [blk[0] / blk[1] for blk in blocks for _ in range(int(blk[2]))]
    return [(x, y) for (x, _, _), y in zip(cells, ys)]


class StepCostModel:
    def __init__(self, forget: float = 0.97, prior_weight: float = 2.0, prior_node_frac: float = 0.03):
        self.forget = forget
        self.prior_weight = prior_weight          # pseudo-observations of the prior slope
        self.prior_node_frac = prior_node_frac    # prior b / t(1): a verified node costs ~3% of a decode
        self._s = [0.0] * 5                       # forgetting sums: w, wT, wT^2, wt, wTt
        self.draft_s_per_seq: float | None = None
        self.num_obs = 0
        self._table: dict[int, list[float]] = {}  # row bucket -> [weight, mean seconds, num_obs when last seen]

    def observe(self, num_tokens: int, seconds: float) -> None:
        """One decode step of `num_tokens` rows took `seconds` (forward only)."""
        f, s, x = self.forget, self._s, float(num_tokens)
        for i, v in enumerate((1.0, x, x * x, seconds, x * seconds)):
            s[i] = f * s[i] + v
        self.num_obs += 1
        cell = self._table.setdefault(row_bucket(num_tokens), [0.0, 0.0, self.num_obs])
        w = cell[0] * AGE_DECAY ** (self.num_obs - cell[2]) * BUCKET_DECAY
        cell[1] = (w * cell[1] + seconds) / (w + 1.0)
        cell[0], cell[2] = w + 1.0, self.num_obs

    def observe_draft(self, num_seqs: int, seconds: float) -> None:
        if num_seqs <= 0:
            return
        per = seconds / num_seqs
        d = self.draft_s_per_seq
        self.draft_s_per_seq = per if d is None else 0.8 * d + 0.2 * per

    @property
    def ready(self) -> bool:
        return self.num_obs > 0

    def coefficients(self) -> tuple[float, float]:
        """(a, b) with t(T) = a + b*T; the slope is pulled toward the prior when T barely varied."""
        w, st, stt, sy, sty = self._s
        mean_t, mean_y = st / w, sy / w
        var = stt / w - mean_t ** 2
        cov = sty / w - mean_t * mean_y
        b_prior = self.prior_node_frac * mean_y / max(1.0, mean_t * self.prior_node_frac + 1.0)
        k = self.prior_weight / w
        b = max((cov + k * b_prior) / (var + k), 0.0)
        a = max(mean_y - b * mean_t, 1e-6)
        return a, b

    def step_time(self, num_tokens: int) -> float:
        a, b = self.coefficients()
        return a + b * num_tokens

    def curve(self, first: int, last: int) -> list[float]:
        """Estimated step seconds for T = first..last rows (non-decreasing): each measured row
        bucket's mean blended with the line (weight `prior_weight`); between measured buckets,
        linear interpolation; beyond them, or where they went stale, the line."""
        a, b = self.coefficients()
        cells = []                                             # (bucket, seconds, weight) of measured buckets
        for k, (w, mean, seen) in sorted(self._table.items()):
            w *= AGE_DECAY ** (self.num_obs - seen)
            if w >= 1.0:
                cells.append((k, (w * mean + self.prior_weight * (a + b * k)) / (w + self.prior_weight), w))
        known = monotone_fit(cells)
        out, floor, j = [], 0.0, 0
        for t in range(max(1, first), max(1, first, last) + 1):
            k = row_bucket(t)
            while j < len(known) and known[j][0] < k:
                j += 1
            if j < len(known) and known[j][0] == k:
                est = known[j][1]
            elif 0 < j < len(known):                           # between two measured buckets
                (k0, t0), (k1, t1) = known[j - 1], known[j]
                est = t0 + (t1 - t0) * (k - k0) / (k1 - k0)
            else:
                est = a + b * t
            floor = max(floor, est)
            out.append(floor)
        return out

    def table_ms(self) -> dict[int, float]:
        """Measured mean step milliseconds per row bucket (for stats)."""
        return {k: round(1000 * v[1], 2) for k, v in sorted(self._table.items())}
