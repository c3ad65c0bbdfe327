"""A hand-written eager forward for Llama-structured decoders (SmolLM2, Llama 2/3, Qwen2/2.5/3).

The transformers forward (runner.py) stays the reference and the fallback: every other family
runs through it, and so do GPUs (this path is measured on CPU only so far). This file computes
the same step for `model_type` llama, qwen2 and qwen3 with fewer, larger ops. Per decoder layer,
for the new tokens' hidden states h [T, d]:

    x = RMSNorm_1(h)                                    (the model's own module: its numerics)
    [q | k | v] = x [W_q; W_k; W_v]^T (+ b)             one GEMM when the weights are packed (no bias)
    q, k = RMSNorm_q(q), RMSNorm_k(k)                   per head, Qwen3 only
    q, k = RoPE(q, k)                                    on q and k together: [T, H + Hkv, D]
    h = h + W_o attention(q, k, v)                       the same paged backend (and sliding window)
    x = RMSNorm_2(h)
    [g | u] = x [W_gate; W_up]^T                         one GEMM when packed
    h = h + W_down (silu(g) * u)

RoPE is rotate-half as in transformers: x cos + rotate_half(x) sin, with rotate_half(x) sin
written as swap_halves(x) * [-sin_1, sin_2] (the same products: negation is exact), and cos /
sin from the model's own rotary module (RoPE scaling included). The fused GEMMs concatenate the
weights' output rows, so every output column is the same dot product over the same inputs; on
this CPU oneDNN returns the same bits as the separate calls at decode shapes (1-64 rows), and
may differ in the last bf16 bit at prompt sizes (~300+ rows), where it blocks differently. fp32
(no packing, no fusion) is bit-identical to the reference on every step (tests). From
PLAIN_FROM_ROWS rows (long prompts) the projections run as separate `F.linear` calls and RoPE
runs on q and k apart: concatenating the outputs cost ~0.4 s of a 9.5 s 8,000-token prefill.
With a `tail` (runner.StepBatch: nothing reads other rows' hidden state) the last layer projects
every row (their K/V go to the cache) but attends and runs o_proj and the MLP for the logits rows
only, one row of a long prompt: ~1/L of its layer work.

What it saves against the reference, per step of SmolLM2-135M (30 layers): 90 of the 211
GEMM calls, the per-layer transposes/reshapes of the attention module, the hooks transformers
uses to record every layer's output, and half of RoPE's elementwise ops. At one row a step is
GEMV weight streaming plus ~2,000 small ops, so the ops removed are a real share of it: 1.25x
tok/s at batch 1 and 1.12x at batch 8 over the reference here (docs/RESULTS.md, "Target-only
throughput", session 17).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from aurora.models.packed_linear import FusedPacked, PackedLinear

FAMILIES = ("llama", "qwen2", "qwen3")     # transformers model_type values this forward reproduces


def supports(model) -> str | None:
    """None when `model` (a *ForCausalLM) fits this forward, else the reason it does not."""
    cfg = model.config
    if getattr(cfg, "model_type", None) not in FAMILIES:
        return f"model_type {getattr(cfg, 'model_type', None)!r}"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act!r}"
    if getattr(cfg, "pretraining_tp", 1) != 1:
        return "pretraining_tp > 1"
    inner = getattr(model, "model", None)
    if inner is None or not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return "unexpected module layout"
    for layer in inner.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None or not all(
                hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj")) or not all(
                hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj")):
            return "unexpected layer layout"
    return None


def _joint(linears):
    """x -> the layers' outputs: one tensor [T, sum out] = [x W_1^T | x W_2^T | ...] when one
    packed GEMM computes them (FusedPacked: all of `linears` packed and unbiased, short inputs),
    else a tuple of their own outputs (never concatenated: a copy per layer)."""
    if all(isinstance(m, PackedLinear) and m.active and m.bias is None for m in linears):
        return FusedPacked(linears)
    return lambda x: tuple(m(x) for m in linears)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x [T, n, D] -> x cos + rotate_half(x) sin, as swap_halves(x) * [-sin_1, sin_2]."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([x[..., half:], x[..., :half]], dim=-1) * sin_signed


class _Layer:
    def __init__(self, layer, head_dim: int):
        attn, mlp = layer.self_attn, layer.mlp
        self.index = attn.layer_idx
        self.norm1, self.norm2 = layer.input_layernorm, layer.post_attention_layernorm
        self.o, self.down = attn.o_proj, mlp.down_proj
        self.heads = attn.q_proj.out_features // head_dim
        self.kv_heads = attn.k_proj.out_features // head_dim
        self.scaling = getattr(attn, "scaling", head_dim ** -0.5)
        self.sliding_window = getattr(attn, "sliding_window", None)         # Qwen2/3 sliding layers
        self.q_norm, self.k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)   # Qwen3
        self.qkv = _joint([attn.q_proj, attn.k_proj, attn.v_proj])              # x -> [T, (H + 2Hkv) D] or (q, k, v)
        self.gate_up = _joint([mlp.gate_proj, mlp.up_proj])                     # x -> [T, 2I] or (g, u)

    def attention_inputs(self, x: torch.Tensor, cos, sin_signed):
        """x [T, d] -> q [T, H, D], k, v [T, Hkv, D]: projected, QK-normed (Qwen3), RoPE'd."""
        T, qkv = x.shape[0], self.qkv(x)
        if isinstance(qkv, tuple):                                            # separate GEMMs
            q, k, v = (t.view(T, -1, cos.shape[-1]) for t in qkv)
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            return _rope(q, cos, sin_signed), _rope(k, cos, sin_signed), v
        D, nq = cos.shape[-1], self.heads + self.kv_heads                     # one GEMM: q | k adjacent,
        qk = qkv[:, :nq * D].view(T, nq, D)                                   # RoPE'd at once [T, H + Hkv, D]
        if self.q_norm is not None:
            qk = torch.cat([self.q_norm(qk[:, :self.heads]), self.k_norm(qk[:, self.heads:])], dim=1)
        qk = _rope(qk, cos, sin_signed)
        return qk[:, :self.heads], qk[:, self.heads:], qkv[:, nq * D:].view(T, self.kv_heads, D)


class FastLlama:
    """`forward(input_ids, positions, attend, feature_layers)` -> (final normed hidden [T, d],
    features [T, 3d]): the runner's step without transformers' forward."""

    def __init__(self, model):
        inner = model.model
        cfg = model.config
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.embed, self.norm, self.rotary = inner.embed_tokens, inner.norm, inner.rotary_emb
        self.layers = [_Layer(layer, self.head_dim) for layer in inner.layers[:cfg.num_hidden_layers]]

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attend, feature_layers, tail=None):
        # input_ids, positions: [T]; attend(layer_idx, q [T, H, D], k, v [T, Hkv, D], scaling,
        # sliding_window) -> [T, H, D]. tail: (rows [R], attend_tail) -> the last layer attends and
        # runs its MLP for `rows` only (attend_tail: q [R, H, D], k, v [T, Hkv, D] -> [R, H, D]) and
        # the hidden state returned is [R, d] (a long prompt needs the last row's only)
        h = self.embed(input_ids)                                             # [T, d]
        cos, sin = self.rotary(h[None], positions[None])                      # [1, T, D] each, h's dtype
        half = self.head_dim // 2
        cos = cos[0, :, None]                                                 # [T, 1, D]
        sin = sin[0, :, None]
        sin_signed = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)   # [T, 1, D]
        T, D = h.shape[0], self.head_dim
        wanted = {i: None for i in feature_layers}
        last = self.layers[-1].index
        if tail is not None and last in wanted:
            raise ValueError("a tail step needs the last layer's output of every row (a feature layer)")
        for layer in self.layers:
            q, k, v = layer.attention_inputs(layer.norm1(h), cos, sin_signed)
            if tail is not None and layer.index == last:
                rows, attend_tail = tail
                out = attend_tail(layer.index, q[rows], k, v, layer.scaling, layer.sliding_window)  # [R, H, D]
                h, T = h[rows], rows.shape[0]
            else:
                out = attend(layer.index, q, k, v, layer.scaling, layer.sliding_window)     # [T, H, D]
            h = h + layer.o(out.reshape(T, layer.heads * D))
            gu = layer.gate_up(layer.norm2(h))                                # [T, 2I] or (g, u)
            g, u = gu if isinstance(gu, tuple) else gu.chunk(2, dim=-1)
            h = h + layer.down(F.silu(g) * u)
            if layer.index in wanted:
                wanted[layer.index] = h
        features = torch.cat([wanted[i] for i in feature_layers], dim=-1)    # [T, 3d]
        return self.norm(h), features
