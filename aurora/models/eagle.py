"""EAGLE-3-style draft head: one decoder layer over the target's own features.

Inputs per row: a token embedding (the target's, frozen) and a feature `g` — either
`fc([low; mid; high])` of the target's hidden states (context rows, "level 1") or the
draft's own output hidden at the row's parent (draft rows, level >= 2: the
training-time-test unroll and tree nodes). Output: logits over a draft vocabulary of
frequent target tokens, mapped back with `d2t`. Serving and training run the same
`forward_rows`, level by level, attending under an explicit row-visibility mask.
"""
from __future__ import annotations

import torch
from torch import nn

from aurora.kernels import tree_attention


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """x: [N, H, D]; rotate-half RoPE at integer positions [N]."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    ang = positions.float()[:, None] * inv[None]                    # [N, D/2]
    cos = torch.cat([ang.cos(), ang.cos()], -1)[:, None].to(x.dtype)
    sin = torch.cat([ang.sin(), ang.sin()], -1)[:, None].to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class EagleHead(nn.Module):
    def __init__(self, hidden: int, heads: int, head_dim: int, intermediate: int, draft_vocab: int,
                 rope_theta: float = 10000.0, eps: float = 1e-6):
        super().__init__()
        self.hidden, self.heads, self.head_dim, self.rope_theta = hidden, heads, head_dim, rope_theta
        self.fc = nn.Linear(3 * hidden, hidden, bias=False)
        self.inp = nn.Linear(2 * hidden, hidden, bias=False)
        self.in_norm = RMSNorm(hidden, eps)
        self.qkv = nn.Linear(hidden, 3 * heads * head_dim, bias=False)
        self.o = nn.Linear(heads * head_dim, hidden, bias=False)
        self.post_norm = RMSNorm(hidden, eps)
        self.gate_up = nn.Linear(hidden, 2 * intermediate, bias=False)
        self.down = nn.Linear(intermediate, hidden, bias=False)
        self.norm = RMSNorm(hidden, eps)
        self.lm_head = nn.Linear(hidden, draft_vocab, bias=False)
        self.register_buffer("d2t", torch.arange(draft_vocab, dtype=torch.long))  # draft id -> target id

    @property
    def draft_vocab(self) -> int:
        return self.lm_head.out_features

    def config_dict(self) -> dict:
        return {"hidden": self.hidden, "heads": self.heads, "head_dim": self.head_dim,
                "intermediate": self.down.in_features, "draft_vocab": self.draft_vocab,
                "rope_theta": self.rope_theta}

    def rows_step(self, emb, g, positions, past_k, past_v, mask):
        """One level of rows. emb, g: [N, hidden]; positions: [N]; past_k/v: [S, H, D] or None;
        mask: [N, S + N] bool over (past rows, these rows). Returns (h [N, hidden], k, v [S+N, H, D])."""
        x = self.inp(torch.cat([emb, g], -1))
        q, k, v = self.qkv(self.in_norm(x)).view(-1, 3, self.heads, self.head_dim).unbind(1)
        q = rope(q, positions, self.rope_theta)
        k = rope(k, positions, self.rope_theta)
        if past_k is not None:
            k, v = torch.cat([past_k, k]), torch.cat([past_v, v])
        att = tree_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                             mask[None], self.head_dim ** -0.5)                # [1, H, N, D]
        x = x + self.o(att[0].transpose(0, 1).reshape(len(q), -1))
        gate, up = self.gate_up(self.post_norm(x)).chunk(2, -1)
        x = x + self.down(nn.functional.silu(gate) * up)
        return x, k, v

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
                         vocab, theta, getattr(cfg, "rms_norm_eps", 1e-6))
        for m in head.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
    return head
