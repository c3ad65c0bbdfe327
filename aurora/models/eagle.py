"""EAGLE-3 draft head: EAGLE-3's own decoder layer over the target's features.

Per row: the target's (frozen) token embedding `e` and a feature `g` -- `fc([low; mid;
high])` of the target's hidden states (context rows, level 1) or the draft's own
pre-norm output at the row's parent (draft rows, level >= 2). The layer, exactly as
EAGLE-3 / vLLM / SGLang compute it (`norm_before_residual=False`: residual = raw g):
    x = [input_layernorm(e); hidden_norm(g)]                      # [N, 2H]
    r = g + o_proj(attn(q_proj(x), k_proj(x), v_proj(x)))         # RoPE on q, k
    h = r + mlp(post_attention_layernorm(r))                      # returned, pre-norm
    logits = lm_head(norm(h))                                     # [N, draft_vocab]
With `norm_before_residual=True` (a speculators option) the residual is hidden_norm(g).
Parameter names follow the legacy EAGLE-3 layout (`midlayer.*`), so export is renaming.
`d2t` holds absolute target ids (EAGLE-3 files store offsets; converted at export/import).
"""
from __future__ import annotations

import torch
from torch import nn

from aurora.kernels import tree_attention

FC_INIT_STD = 0.002


class RMSNorm(nn.Module):
    """x / rms(x) * weight, by torch's fused kernel (one op instead of six; fp32 values equal the
    written-out formula's, bf16 within one rounding). Mixed dtypes (the fp32 training copy fed
    the target's bf16 embeddings) compute in the wider one, as type promotion did before."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        w = self.weight
        if x.dtype != w.dtype:
            dtype = torch.promote_types(x.dtype, w.dtype)
            x, w = x.to(dtype), w.to(dtype)
        return nn.functional.rms_norm(x, w.shape, w, self.eps)


_ROPE_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _rope_table(n: int, d: int, theta: float, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [>= n, D] for positions 0.. (grown by doubling; the same values `rope` computed
    per call before, so proposals do not change)."""
    key = (d, theta, str(device), dtype)
    tab = _ROPE_TABLES.get(key)
    if tab is None or tab[0].shape[0] < n:
        size = max(1024, 1 << max(0, n - 1).bit_length())
        inv = 1.0 / theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d)
        ang = torch.arange(size, device=device, dtype=torch.float32)[:, None] * inv[None]   # [size, D/2]
        tab = (torch.cat([ang.cos(), ang.cos()], -1).to(dtype), torch.cat([ang.sin(), ang.sin()], -1).to(dtype))
        _ROPE_TABLES[key] = tab
    return tab


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """x: [N, H, D] (q and k heads side by side: one call rotates both); rotate-half RoPE at
    integer positions [N] (cos/sin from a cached table)."""
    d = x.shape[-1]
    n = int(positions.max()) + 1 if positions.numel() else 1
    cos_t, sin_t = _rope_table(n, d, theta, x.device, x.dtype)
    cos, sin = cos_t[positions][:, None], sin_t[positions][:, None]          # [N, 1, D]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Eagle3Attention(nn.Module):
    """Llama attention whose q/k/v read the 2H concat [embeds; hidden]."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int):
        super().__init__()
        self.q_proj = nn.Linear(2 * hidden, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(2 * hidden, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(2 * hidden, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)


class Eagle3MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x, gate_up=None):
        """gate_up: one fused GEMM for gate and up (serving), else the two layers."""
        if gate_up is not None:
            gu = gate_up(x)                                                    # [N, 2I] or (gate, up)
            gate, up = gu if isinstance(gu, tuple) else gu.chunk(2, -1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(nn.functional.silu(gate) * up)


class Eagle3Layer(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, intermediate: int, eps: float):
        super().__init__()
        self.input_layernorm = RMSNorm(hidden, eps)
        self.hidden_norm = RMSNorm(hidden, eps)
        self.self_attn = Eagle3Attention(hidden, heads, kv_heads, head_dim)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.mlp = Eagle3MLP(hidden, intermediate)


class EagleHead(nn.Module):
    def __init__(self, hidden: int, heads: int, head_dim: int, intermediate: int, draft_vocab: int,
                 rope_theta: float = 10000.0, eps: float = 1e-6, kv_heads: int | None = None,
                 norm_before_residual: bool = False, target_hidden: int | None = None):
        super().__init__()
        self.hidden, self.heads, self.head_dim, self.rope_theta = hidden, heads, head_dim, rope_theta
        self.kv_heads = kv_heads or heads
        self.eps = eps
        self.norm_before_residual = norm_before_residual
        self.target_hidden = target_hidden or hidden
        self.fc = nn.Linear(3 * self.target_hidden, hidden, bias=False)
        self.midlayer = Eagle3Layer(hidden, heads, self.kv_heads, head_dim, intermediate, eps)
        self.norm = RMSNorm(hidden, eps)
        self.lm_head = nn.Linear(hidden, draft_vocab, bias=False)
        self.register_buffer("d2t", torch.arange(draft_vocab, dtype=torch.long))  # draft id -> target id
        self._qkv = self._gate_up = None     # fused serving GEMMs (fuse_for_serving), not parameters

    def fuse_for_serving(self) -> bool:
        """q/k/v as one packed GEMM and gate/up as another (models/packed_linear.py's FusedPacked:
        5 calls -> 2 per head call; a hot swap's in-place write repacks them). Only for a head
        whose linears pack_linears wrapped (CPU bf16/fp32 serving slots); returns whether it fused."""
        from aurora.models.packed_linear import FusedPacked, PackedLinear
        attn, mlp = self.midlayer.self_attn, self.midlayer.mlp
        layers = [attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj]
        if not all(isinstance(m, PackedLinear) for m in layers):
            return False
        self._qkv, self._gate_up = FusedPacked(layers[:3], True), FusedPacked(layers[3:], True)
        return True

    @property
    def draft_vocab(self) -> int:
        return self.lm_head.out_features

    @property
    def intermediate(self) -> int:
        return self.midlayer.mlp.down_proj.in_features

    def config_dict(self) -> dict:
        return {"hidden": self.hidden, "heads": self.heads, "kv_heads": self.kv_heads, "head_dim": self.head_dim,
                "intermediate": self.intermediate, "draft_vocab": self.draft_vocab,
                "rope_theta": self.rope_theta, "rms_norm_eps": self.eps,
                "norm_before_residual": self.norm_before_residual, "target_hidden": self.target_hidden}

    @classmethod
    def from_config(cls, cfg: dict) -> "EagleHead":
        return cls(cfg["hidden"], cfg["heads"], cfg["head_dim"], cfg["intermediate"], cfg["draft_vocab"],
                   cfg.get("rope_theta", 10000.0), cfg.get("rms_norm_eps", 1e-6), cfg.get("kv_heads"),
                   cfg.get("norm_before_residual", False), cfg.get("target_hidden"))

    def rows_step(self, emb, g, positions, past_k, past_v, mask):
        """One level of rows. emb, g: [N, hidden]; positions: [N]; past_k/v: [S, Hkv, D] or None;
        mask: [N, S + N] bool over (past rows, these rows). Returns (h [N, hidden] pre-norm layer
        output, k, v [S+N, Hkv, D])."""
        layer, attn = self.midlayer, self.midlayer.self_attn
        gn = layer.hidden_norm(g)
        residual = gn if self.norm_before_residual else g
        x = torch.cat([layer.input_layernorm(emb), gn], -1)                    # [N, 2H]
        n, nh, nkv = x.shape[0], self.heads, self.kv_heads
        if self._qkv is not None:                                              # serving: one GEMM
            y = self._qkv(x)
            y = torch.cat(y, -1) if isinstance(y, tuple) else y
            y = y.view(n, nh + 2 * nkv, self.head_dim)                         # [N, H + 2Hkv, D]
            qk, v = rope(y[:, :nh + nkv], positions, self.rope_theta), y[:, nh + nkv:]
            q, k = qk[:, :nh], qk[:, nh:]
        else:
            q = rope(attn.q_proj(x).view(n, nh, self.head_dim), positions, self.rope_theta)
            k = rope(attn.k_proj(x).view(n, nkv, self.head_dim), positions, self.rope_theta)
            v = attn.v_proj(x).view(n, nkv, self.head_dim)
        if past_k is not None:
            k, v = torch.cat([past_k, k]), torch.cat([past_v, v])
        att = tree_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                             mask[None], self.head_dim ** -0.5)                # [1, H, N, D]
        r = residual + attn.o_proj(att[0].transpose(0, 1).reshape(n, -1))
        h = r + layer.mlp(layer.post_attention_layernorm(r), self._gate_up)
        return h, k, v

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, draft_vocab] float32."""
        return self.lm_head(self.norm(h)).float()


def build_head(runner, draft_vocab: int, seed: int = 0) -> EagleHead:
    cfg = runner.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    theta = 10000.0
    rp = getattr(cfg, "rope_parameters", None) or {}
    if isinstance(rp, dict) and "rope_theta" in rp:
        theta = float(rp["rope_theta"])
    elif getattr(cfg, "rope_theta", None):
        theta = float(cfg.rope_theta)
    vocab = runner.vocab_size if draft_vocab <= 0 else min(draft_vocab, runner.vocab_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = EagleHead(cfg.hidden_size, cfg.num_attention_heads, head_dim, cfg.intermediate_size,
                         vocab, theta, getattr(cfg, "rms_norm_eps", 1e-6))   # kv_heads = heads (MHA)
        for m in head.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        # The residual stream starts as g = fc(features); a small fc keeps it from drowning the
        # layer's attention/MLP output at first (measured: faster early learning on tiny-llama).
        nn.init.normal_(head.fc.weight, std=FC_INIT_STD)
    return head
