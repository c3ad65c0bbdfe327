"""Weight-only quantization of the target's linear layers for CPU decode (weights stream faster).

int4: asymmetric 4-bit, groups of 32 along the input dim, w = q * scale + min (q in 0..15), run by
torch's CPU kernel `_weight_int4pack_mm_for_cpu`. This is llama.cpp's Q4_1 layout: a Q4_1 GGUF
(the default model's linear layers) re-quantizes to the same values up to bf16 rounding of
scale/min. int8: symmetric per output channel, w = q * scale (|q| <= 127), `_weight_int8pack_mm`.
Exactness is defined against the quantized weights: speculative greedy == plain greedy, same weights.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger("aurora.models")
QUANT_MODES = ("none", "int8", "int4")
INT4_GROUP = 32


class Int8Linear(nn.Module):
    """y = x @ (q * scale).T (+ bias); q int8 [N, K], scale per output channel."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()                                   # [N, K]
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)                 # [N]
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("qweight", (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        self.bias = linear.bias

    def dequantized(self) -> torch.Tensor:                                   # [N, K] float32
        return self.qweight.float() * self.scale.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:                      # [..., K] -> [..., N]
        flat = x.reshape(-1, self.in_features)
        y = torch.ops.aten._weight_int8pack_mm(flat, self.qweight, self.scale.to(x.dtype))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


class Int4Linear(nn.Module):
    """y = x @ (q * scale + min).T (+ bias); 4-bit q in groups of INT4_GROUP along K (Q4_1)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()                                   # [N, K]
        n, k = w.shape
        groups = w.reshape(n, k // INT4_GROUP, INT4_GROUP)
        low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        scale = ((high - low) / 15).clamp(min=1e-12)                         # [N, K/g, 1]
        q = ((groups - low) / scale).round().clamp(0, 15).to(torch.int32).reshape(n, k)
        self.in_features, self.out_features = k, n
        self.register_buffer("qweight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        # the kernel computes (q - 8) * scale + zero, so zero = min + 8 * scale; layout [K/g, N, 2]
        sz = torch.cat([scale, low + 8 * scale], dim=-1).transpose(0, 1).contiguous()
        self.register_buffer("scale_zero", sz.to(linear.weight.dtype))
        self.bias = linear.bias

    def dequantized(self) -> torch.Tensor:                                   # [N, K] float32, as the kernel sees it
        eye = torch.eye(self.in_features, dtype=torch.float32, device=self.qweight.device)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.qweight, INT4_GROUP,
                                                          self.scale_zero.float()).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:                      # [..., K] -> [..., N]
        flat = x.reshape(-1, self.in_features)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.qweight, INT4_GROUP,
                                                        self.scale_zero.to(x.dtype))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def int4_fits(linear: nn.Linear) -> bool:
    return linear.out_features % 16 == 0 and linear.in_features % INT4_GROUP == 0


def quantize_model(model: nn.Module, mode: str) -> dict:
    """Replace the target's nn.Linear layers in place (decoder projections and the LM head; the
    input embedding stays as is). int4 falls back to int8 where a shape does not fit the kernel.
    Returns {"int4": n, "int8": n} layers converted."""
    if mode not in QUANT_MODES:
        raise ValueError(f"quantize must be one of {QUANT_MODES}, got {mode!r}")
    done = {"int4": 0, "int8": 0}
    if mode == "none":
        return done
    if next(model.parameters()).device.type != "cpu":
        raise ValueError("weight-only quantization uses torch's CPU kernels; run with device='cpu'")
    head = model.get_output_embeddings()
    targets = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    for name, linear in targets:
        kind = "int4" if mode == "int4" and int4_fits(linear) else "int8"
        new = Int4Linear(linear) if kind == "int4" else Int8Linear(linear)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
        done[kind] += 1
    if head is not None and isinstance(head, nn.Linear):
        model.config.tie_word_embeddings = False        # the head now has its own (quantized) weights
    log.info("aurora: quantized target linear layers: %s", done)
    return done
