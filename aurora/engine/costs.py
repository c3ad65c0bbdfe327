"""Online cost model of a target step, learned from the engine's own timings.

A decode step over B sequences verifying N draft nodes in total runs T = B + N tokens;
its time is modelled as t(T) = a + b*T (weights streamed once per step: a; per-token
compute: b), fitted by least squares with exponential forgetting over recent decode steps,
so it follows the batch size, context length and machine load it actually sees. The
draft's cost per proposing sequence is an exponential average of measured proposal times.
"""
from __future__ import annotations


class StepCostModel:
    def __init__(self, forget: float = 0.97, prior_weight: float = 2.0, prior_node_frac: float = 0.03):
        self.forget = forget
        self.prior_weight = prior_weight          # pseudo-observations of the prior slope
        self.prior_node_frac = prior_node_frac    # prior b / t(1): a verified node costs ~3% of a decode
        self._s = [0.0] * 5                       # forgetting sums: w, wT, wT^2, wt, wTt
        self.draft_s_per_seq: float | None = None
        self.num_obs = 0

    def observe(self, num_tokens: int, seconds: float) -> None:
        """One decode step of `num_tokens` rows took `seconds` (forward only)."""
        f, s, x = self.forget, self._s, float(num_tokens)
        for i, v in enumerate((1.0, x, x * x, seconds, x * seconds)):
            s[i] = f * s[i] + v
        self.num_obs += 1

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
