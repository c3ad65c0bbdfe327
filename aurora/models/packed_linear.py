"""Linear layers whose bf16 or fp32 weights are packed once, at load, into the CPU GEMM library's layout.

`F.linear(x, W)` on a bf16 CPU tensor hands W to oneDNN, which re-lays it out into its blocked
(AMX / AVX-512 tile) format on every call. A decode step makes ~210 such calls over 1-8 rows each,
so that per-call reordering, not the arithmetic, is much of the step. Each wrapped layer keeps the
model's weight W [out, in] and a copy packed once (`torch.ops.mkldnn._reorder_linear_weight`),
and computes

    y = x @ W^T + b    by oneDNN on the packed copy   (CPU, bf16 or fp32, no gradient wanted)
    y = F.linear(x, W, b)                               otherwise (autograd, other devices/dtypes,
                                                        and >= PLAIN_FROM_ROWS rows: a long prompt)

A weight written in place (the serving slots of a learned draft, at each hot swap) is repacked
at its next call: the copy remembers the weight's version counter. The same bf16 products,
summed by the same library: on this CPU the outputs were bit-identical to
`F.linear` at 1, 3, 8, 64 and 512 rows. Measured on a 2-core Intel Xeon with AMX, SmolLM2-135M's
210 decoder linears with cold caches (one pass over all of them, medians of 15, ms):

    rows          1      4      8      16     32     48
    F.linear    32.1   27.7   23.6   34.0   27.4   34.6
    packed      26.0   24.5   16.0   28.4   20.2   22.1

and the 49,152-row LM head 5.1 -> 3.0 ms at one row, 5.6 -> 3.6 ms at 8 (docs/RESULTS.md, "Target-only
throughput", session 16). It also beats the fp32 weight copies this file used to keep for 1-3 rows (27.5 / 31.1
/ 33.8 ms -> 25.5 / 26.4 / 25.4) at half their memory: a packed copy costs 2 bytes per weight
(~270 MB for SmolLM2-135M, LM head included).

fp32 (the dtype `auto` picks on a CPU without native bf16, e.g. an AVX2-only AMD EPYC, where
oneDNN cannot pack bf16 at all): `F.linear` goes to MKL, whose few-row kernels are slow there; the
packed oneDNN GEMM is not. The same 210 linears, fp32, 2-core AVX2 EPYC (ms, medians of 10):

    rows          1      2      4      8      17
    F.linear    59.7   93.7  129.5  132.6  146.5
    packed      43.6   74.3   66.6   78.6   82.5

A decode step of the engine went 144 -> 96 ms (examples/spec_costs.py). The fp32 products are
not `F.linear`'s bits (another summation order; |diff| ~1e-6), but every row gets the same bits
whatever the row count of its call, which `F.linear` in fp32 does not guarantee (its one-row
path is another kernel): a verify step of 17 rows and a plain decode of 1 compute each row
alike. A packed fp32 copy costs 4 bytes per weight (~540 MB for SmolLM2-135M).

Models whose copies would pass `COPY_BUDGET_BYTES`
are left as they are, and so is every model on a CPU where a timing at load (`packed_time_ratio`:
alternating passes over all its linears at 1 and 8 rows, ~0.7 s) does not show the packed path
clearly faster, or whose torch lacks the oneDNN ops (or cannot pack the dtype on this CPU).
The timing is taken once per process for a model's linear shapes and dtype, and repeated (up to
CALIBRATION_TRIES, median) while it lands within AMBIGUOUS of PAYS_BELOW: one 0.7 s timing on a
busy 2-core machine once read 1.18 / 0.72 and left one of six identical engines of a process
unpacked, its 16-row linears at 131 ms against 68-87 ms for the five others, which a benchmark
then read as that engine's own speed.

Long prompts go the other way: for thousands of rows the reorder is amortised and oneDNN's own
choice for a plain weight is the faster GEMM. One decoder layer's 7 linears (ms, medians of 7,
alternating): 8,000 rows 66-73 plain vs 77-81 packed; 4,000 rows 35.3 vs 38.2; 1,024 rows 14.0 vs
12.6; 256 rows 7.9 vs 6.0. So calls of >= PLAIN_FROM_ROWS rows take `F.linear`.
"""
from __future__ import annotations

import functools
import logging
import statistics
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("aurora.models")
COPY_BUDGET_BYTES = 1 << 30          # larger models are left as they are (a copy doubles their linear weights)
PAYS_BELOW = 0.95                    # mean packed / plain time below which the copies are worth their memory
BATCH_HINT = 8                       # the row count oneDNN is told to pack for (any count works)
CALIBRATION_ROWS = (1, 8)            # batch-1 decode; a batch of decodes or a small draft tree
PLAIN_FROM_ROWS = 2048               # calls this large (prefill of long prompts) are faster unpacked
PACKED_DTYPES = (torch.bfloat16, torch.float32)
CALIBRATION_TRIES = 3                # timings at most, while the answer is within AMBIGUOUS of PAYS_BELOW
AMBIGUOUS = 0.1
_DECISIONS: dict[tuple, bool] = {}   # (dtype, linear shapes) -> packing pays, timed once per process


@functools.cache
def packing_supported(dtype: torch.dtype) -> bool:
    """Whether this CPU's oneDNN packs `dtype` weights (bf16 needs AVX-512 or AVX-NE-CONVERT;
    on an AVX2-only CPU only fp32 packs)."""
    try:
        _pack(torch.zeros(8, 8, dtype=dtype))
    except (RuntimeError, AttributeError):
        return False
    return True


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), BATCH_HINT)


def _packed_product(x: torch.Tensor, packed: torch.Tensor, bias, out_features: int) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])                                           # [rows, in]
    y = torch.ops.mkldnn._linear_pointwise(x2, packed, bias, "none", [], "")  # [rows, out]
    return y.reshape(*x.shape[:-1], out_features)


class PackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias                  # [out, in] bf16 (the model's)
        self.register_buffer("packed", _pack(linear.weight), persistent=False)   # oneDNN's layout of it
        self._packed_version = linear.weight._version
        self.active = True
        self.fused = False                   # True: a FusedPacked computes it (its own copy released)

    def forward(self, x: torch.Tensor) -> torch.Tensor:                      # [..., in] -> [..., out]
        w = self.weight
        if (not self.active or self.fused or w.dtype not in PACKED_DTYPES or x.dtype != w.dtype or x.device.type != "cpu"
                or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
                or x.numel() >= PLAIN_FROM_ROWS * self.in_features):
            return F.linear(x, w, self.bias)
        if self._packed_version != w._version:   # written in place since (a learned draft's hot swap)
            self.packed, self._packed_version = _pack(w), w._version
        return _packed_product(x, self.packed, self.bias, self.out_features)


class FusedPacked:
    """One packed GEMM for several layers that read the same input (q/k/v, gate/up): their
    weights' rows concatenated, [sum out, in], packed once. Each output column is the same dot
    product as in its own layer's call. The layers' own packed copies are released (they then
    take `F.linear`, same values), so memory does not grow. With `track_writes` (a learned
    draft's serving slot, written in place at each hot swap) a weight written since the last call
    is repacked then, as PackedLinear does; a model's fixed weights skip that check (~60 calls a
    step)."""

    def __init__(self, layers: list[PackedLinear], track_writes: bool = False):
        if any(m.bias is not None for m in layers):
            raise ValueError("FusedPacked: biased layers are not fused")
        self.layers = layers
        self.in_features = layers[0].in_features
        self.out_features = sum(m.out_features for m in layers)
        self.packed = _pack(torch.cat([m.weight.detach() for m in layers]))   # [sum out, in], packed
        self._versions = self._weight_versions() if track_writes else None
        for m in layers:
            m.fused = True
            m.packed = torch.empty(0, dtype=m.weight.dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """[..., in] -> [..., sum out] from the one packed GEMM; from PLAIN_FROM_ROWS rows (a long
        prompt) the layers' own `F.linear` outputs as a tuple, not concatenated: at 8,000 rows
        the concatenation copies took ~0.4 s of a 9.5 s SmolLM2 prefill."""
        if x.numel() >= PLAIN_FROM_ROWS * self.in_features:
            return tuple(F.linear(x, m.weight) for m in self.layers)
        if self._versions is not None:
            versions = self._weight_versions()
            if versions != self._versions:             # written in place since: repack once
                self.packed = _pack(torch.cat([m.weight.detach() for m in self.layers]))
                self._versions = versions
        return _packed_product(x, self.packed, None, self.out_features)

    def _weight_versions(self) -> tuple[int, ...]:
        return tuple(m.weight._version for m in self.layers)


def packed_time_ratio(layers: list[PackedLinear], rows: tuple[int, ...] = CALIBRATION_ROWS,
                      passes: int = 5) -> list[float]:
    """For each row count: median time of one pass over `layers` on their packed copies over the
    median time of the same pass with `F.linear`, passes alternating (the machine's drift falls on
    both alike). A pass over every layer reads the weights from memory, as a decode step does; one
    layer timed alone sits in cache and swung 0.6-1.4 between runs here."""
    out = []
    with torch.inference_mode():
        for n in rows:
            xs = {m.in_features: torch.randn(n, m.in_features).to(m.weight.dtype) for m in layers}   # [n, in]
            times: dict[bool, list[float]] = {True: [], False: []}
            for i in range(2 * passes + 2):
                active = bool(i % 2)
                for m in layers:
                    m.active = active
                t0 = time.perf_counter()
                for m in layers:
                    m(xs[m.in_features])
                if i >= 2:                                    # the first pass of each kind warms up
                    times[active].append(time.perf_counter() - t0)
            for m in layers:
                m.active = True
            out.append(sorted(times[True])[passes // 2] / sorted(times[False])[passes // 2])
    return out


def pack_linears(model: nn.Module, budget_bytes: int = COPY_BUDGET_BYTES, calibrate: bool = True) -> int:
    """Wrap every bf16 or fp32 CPU nn.Linear of `model` (LM head included); returns the bytes of the packed
    copies. Left as it is (returns 0): nothing to wrap, copies over `budget_bytes`, a torch without
    the oneDNN ops, or, with `calibrate`, a CPU where the packed path is not clearly faster over
    the whole model (mean ratio over CALIBRATION_ROWS < PAYS_BELOW; measured here: 0.76-0.92 in
    six loads, single ratios 0.66-0.96)."""
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if type(child) is nn.Linear and child.weight.dtype in PACKED_DTYPES
               and child.weight.device.type == "cpu"]
    if not targets:
        return 0
    size = sum(child.weight.element_size() * child.weight.numel() for _, _, child in targets)
    if size > budget_bytes:
        log.info("packed linear weights skipped: the copies would exceed %d MiB", budget_bytes >> 20)
        return 0
    try:
        wrapped = [PackedLinear(child) for _, _, child in targets]
        pays = _packing_pays(wrapped) if calibrate else True
    except (RuntimeError, AttributeError) as exc:          # a torch built without oneDNN's linear ops
        log.info("packed linear weights unavailable here: %s", exc)
        return 0
    if not pays:
        return 0
    for (parent, name, _), layer in zip(targets, wrapped):
        setattr(parent, name, layer)
    return size


def _packing_pays(wrapped: list[PackedLinear]) -> bool:
    """Whether the packed copies are clearly faster for these layers on this CPU: timed once per
    process and (dtype, shapes), again while the mean ratio is ambiguous (median of the means)."""
    key = (wrapped[0].weight.dtype, tuple(tuple(m.weight.shape) for m in wrapped))
    if key not in _DECISIONS:
        means = []
        for _ in range(CALIBRATION_TRIES):
            ratios = packed_time_ratio(wrapped)
            means.append(sum(ratios) / len(ratios))
            if abs(means[-1] - PAYS_BELOW) >= AMBIGUOUS:
                break
        _DECISIONS[key] = statistics.median(means) < PAYS_BELOW
        if not _DECISIONS[key]:
            log.info("linear weights stay unpacked: packed / plain time %s on this CPU",
                     " / ".join(f"{m:.2f}" for m in means))
    return _DECISIONS[key]


@contextmanager
def plain_linears(model: nn.Module):
    """Every wrapped layer computes with `F.linear` meanwhile (e.g. while transformers `generate`
    runs on the same model object as a baseline)."""
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    for m in layers:
        m.active = False
    try:
        yield
    finally:
        for m in layers:
            m.active = True
