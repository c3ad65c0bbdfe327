"""Linear layers that pick their weight's dtype by the number of rows they multiply.

On this CPU (a 2-core Intel Xeon with AMX, bf16 weights) a bf16 GEMM over 1-3 rows costs a near-fixed
~35-170 us per call, while an fp32 GEMV over a copy of the same weight runs at memory speed;
from 4 rows on, bf16 wins (medians of 60 calls, bf16 / fp32 us, x cast to fp32 and back included):

    576 -> 576    1 row 72 / 29    3 rows 66 / 30    4 rows 64 / 95
    576 -> 1536   1 row 104 / 66   3 rows 95 / 74    4 rows 99 / 127
    1536 -> 576   1 row 178 / 147  2 rows 164 / 69   4 rows 146 / 166

So each wrapped layer keeps the model's bf16 weight W and an fp32 copy, and computes

    y = (float(x) @ float(W)^T).to(bf16)   if rows(x) <= max_rows   (EngineConfig.fp32_rows)
    y =  x @ W^T  (bf16 GEMM)               otherwise.

Both are the same product of the same bf16 numbers; they differ only in where they round (bf16
output is not bit-exact across batch shapes anyway; fp32 engines are never wrapped). A batch-1
decode step without draft nodes, one row per call, is the case it is for: SmolLM2-135M plain
decoding at batch 1 went from 12.1 to 14.8 tok/s (same process, wrapper on/off alternately; README). The fp32 copies cost
4 bytes per weight (425 MB for SmolLM2-135M's decoder layers; the LM head is left alone: at
one row both dtypes cost the same). Larger models, whose copies would pass
`COPY_BUDGET_BYTES`, are not wrapped, and neither is any model on a CPU where a quick timing at
load (`fp32_time_ratio`, a few ms) does not show the fp32 path clearly faster.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("aurora.models")
COPY_BUDGET_BYTES = 1 << 30          # larger models keep bf16 only (a copy is 2x their bf16 linear weights)
PAYS_BELOW = 0.85                    # fp32 / bf16 time at which the copies are worth their memory


class RowAdaptiveLinear(nn.Module):
    def __init__(self, linear: nn.Linear, max_rows: int):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias              # [out, in] bf16 (the model's)
        self.register_buffer("weight32", linear.weight.detach().float(), persistent=False)   # [out, in]
        self.register_buffer("bias32", None if linear.bias is None else linear.bias.detach().float(),
                             persistent=False)
        self.max_rows = max_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:                  # [..., in] -> [..., out]
        if x.numel() <= self.max_rows * self.in_features:
            return F.linear(x.float(), self.weight32, self.bias32).to(x.dtype)
        return F.linear(x, self.weight, self.bias)


def fp32_time_ratio(weight: torch.Tensor, rows: tuple[int, ...], calls: int = 15) -> list[float]:
    """Median time of `F.linear` on an fp32 copy of `weight` (casts included) over the median
    time on the bf16 weight itself, for each row count, on this machine and thread count."""
    def median_s(fn, x) -> float:
        for _ in range(3):
            fn(x)
        t = []
        for _ in range(calls):
            t0 = time.perf_counter()
            fn(x)
            t.append(time.perf_counter() - t0)
        return sorted(t)[calls // 2]

    w32 = weight.detach().float()
    out = []
    with torch.inference_mode():
        for n in rows:
            x = torch.randn(n, weight.shape[1]).to(weight.dtype)                  # [n, in]
            bf16 = median_s(lambda v: F.linear(v, weight), x)
            fp32 = median_s(lambda v: F.linear(v.float(), w32).to(v.dtype), x)
            out.append(fp32 / bf16)
    return out


def adapt_linears(model: nn.Module, max_rows: int, skip: tuple[nn.Module, ...] = (),
                  budget_bytes: int = COPY_BUDGET_BYTES, calibrate: bool = True) -> int:
    """Wrap every bf16 nn.Linear of `model` except `skip` (e.g. the LM head, where both dtypes
    cost the same at one row and bf16 wins above); returns the bytes of the fp32 copies. Left as
    it is (returns 0): a model whose copies would exceed `budget_bytes`, or, with `calibrate`, a
    CPU where the fp32 path is not clearly faster (< PAYS_BELOW of the bf16 time) on the largest
    layer at one row, the case that gains most (CPUs differ; a clear margin keeps the decision
    from flipping with timing noise)."""
    skip_ids = {id(m) for m in skip}
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if type(child) is nn.Linear and id(child) not in skip_ids and child.weight.dtype == torch.bfloat16]
    if not targets:
        return 0
    if sum(4 * child.weight.numel() for _, _, child in targets) > budget_bytes:
        log.info("fp32 weight copies for few-row linear calls skipped: they would exceed %d MiB",
                 budget_bytes >> 20)
        return 0
    if calibrate:
        largest = max((child for _, _, child in targets), key=lambda m: m.weight.numel())
        ratio = fp32_time_ratio(largest.weight, (1,))[0]
        if ratio > PAYS_BELOW:
            log.info("few-row linear calls stay bf16: fp32 / bf16 time %.2f at one row on this CPU", ratio)
            return 0
    for parent, name, child in targets:
        setattr(parent, name, RowAdaptiveLinear(child, max_rows))
    return sum(4 * child.weight.numel() for _, _, child in targets)


@contextmanager
def plain_linears(model: nn.Module):
    """Every wrapped layer computes in the model's dtype meanwhile (e.g. while transformers
    `generate` runs on the same model object as a baseline)."""
    layers = [m for m in model.modules() if isinstance(m, RowAdaptiveLinear)]
    saved = [m.max_rows for m in layers]
    for m in layers:
        m.max_rows = 0
    try:
        yield
    finally:
        for m, r in zip(layers, saved):
            m.max_rows = r
