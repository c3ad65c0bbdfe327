"""The compared systems, each behind one small interface: serve one prompt (token ids)
at batch 1 and return its output tokens, wall seconds and accepted length tau.

HF systems run transformers `generate` (plain, or assisted with prompt lookup) on a
separately loaded copy of the same target weights; Aurora systems are engines with
different drafts. A system that cannot be built here raises `Unavailable`.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch

from aurora.engine.worker import ComputeThread
from aurora.types import SamplingParams

REQUEST_TIMEOUT_S = 1800.0


class Unavailable(RuntimeError):
    """This system cannot run here (no checkpoint given, flywheel missing, ...)."""


@dataclass(frozen=True)
class SystemSpec:
    label: str                   # one line for tables and legends
    kind: str                    # "hf" | "aurora" | "llamacpp" (bench/peers.py)
    draft: str = "none"          # Aurora draft string; "{ckpt}" is filled from --checkpoint
    online: bool = False
    lookup: bool = False         # HF: assisted generation with prompt lookup
    needs_checkpoint: bool = False
    discard: bool = False        # online: also the discard hinge + counterfactual KL on rejected proposals
    adaptive: bool = False       # Aurora: SpecConfig(adaptive=True), verify only the nodes that pay
    policy_sources: bool = True  # Aurora, adaptive: SpecConfig(policy_sources=...)
    policy_costs: str = "measured"  # Aurora, adaptive: SpecConfig(policy_costs=...)
    ngram_depth: int = 0         # Aurora: SpecConfig.ngram_depth (tokens prompt lookup copies; 0 = default)
    tree_nodes: int = 0          # Aurora: SpecConfig.max_nodes and suffix_max_depth (0 = defaults, 16)
    compile: str = "off"         # Aurora: EngineConfig.compile (target step)
    quantize: str = "none"       # Aurora: EngineConfig.quantize (target weights)


SYSTEMS: dict[str, SystemSpec] = {
    "hf": SystemSpec("transformers generate, target only", "hf"),
    "hf-lookup": SystemSpec("transformers assisted, prompt lookup", "hf", lookup=True),
    "none": SystemSpec("Aurora, no draft", "aurora", "none"),
    "ngram": SystemSpec("Aurora, n-gram draft", "aurora", "ngram"),
    "eagle": SystemSpec("Aurora, EAGLE static (checkpoint, frozen)", "aurora", "eagle:{ckpt}",
                        needs_checkpoint=True),
    "eagle-init": SystemSpec("Aurora, EAGLE random init, frozen (day 0)", "aurora", "eagle"),
    "online": SystemSpec("Aurora, eagle+ngram online from scratch", "aurora", "eagle+ngram", online=True),
    "online-discard": SystemSpec("Aurora, eagle+ngram online, imitation + discard sampling (w 0.5/0.5)",
                                 "aurora", "eagle+ngram", online=True, discard=True),
    "online-ckpt": SystemSpec("Aurora, eagle+ngram online from checkpoint", "aurora", "eagle:{ckpt}+ngram",
                              online=True, needs_checkpoint=True),
    # the suffix draft (memory of all traffic) alone and composed by tree union
    "suffix": SystemSpec("Aurora, suffix draft (memory of all traffic)", "aurora", "suffix"),
    "suffix+ngram": SystemSpec("Aurora, suffix+ngram", "aurora", "suffix+ngram"),
    "eagle+suffix": SystemSpec("Aurora, eagle+suffix online from scratch", "aurora", "eagle+suffix", online=True),
    "eagle+suffix+ngram": SystemSpec("Aurora, eagle+suffix+ngram online from scratch", "aurora",
                                     "eagle+suffix+ngram", online=True),
    "ngram-d10": SystemSpec("Aurora, n-gram draft copying up to 10 tokens", "aurora", "ngram", ngram_depth=10),
    "suffix+ngram-d10": SystemSpec("Aurora, suffix+ngram, prompt lookup copying up to 10 tokens", "aurora",
                                   "suffix+ngram", ngram_depth=10),
    "suffix+ngram-n32": SystemSpec("Aurora, suffix+ngram, trees up to 32 nodes / suffix depth 32", "aurora",
                                   "suffix+ngram", tree_nodes=32),
    "suffix+ngram-adaptive": SystemSpec("Aurora, suffix+ngram, adaptive tree policy", "aurora", "suffix+ngram",
                                        adaptive=True),
    "suffix+ngram-adaptive-n32": SystemSpec("Aurora, suffix+ngram, adaptive policy, trees up to 32 nodes / suffix "
                                            "depth 32", "aurora", "suffix+ngram", adaptive=True, tree_nodes=32),
    "suffix+ngram-adaptive-pooled": SystemSpec("Aurora, suffix+ngram, adaptive policy pooling acceptance by kind "
                                               "(SpecConfig(policy_sources=False), for A/Bs)", "aurora",
                                               "suffix+ngram", adaptive=True, policy_sources=False),
    "suffix+ngram-adaptive-linear": SystemSpec("Aurora, suffix+ngram, adaptive policy on a linear step-cost model "
                                               "(SpecConfig(policy_costs='linear'), for A/Bs)", "aurora",
                                               "suffix+ngram", adaptive=True, policy_costs="linear"),
    "suffix+ngram-adaptive-pooled-linear": SystemSpec("Aurora, suffix+ngram, adaptive policy pooled by kind on a "
                                                      "linear cost model (for A/Bs)", "aurora", "suffix+ngram",
                                                      adaptive=True, policy_sources=False, policy_costs="linear"),
    "eagle+suffix+ngram-adaptive": SystemSpec("Aurora, eagle+suffix+ngram online from scratch, adaptive tree policy",
                                              "aurora", "eagle+suffix+ngram", online=True, adaptive=True),
    "eagle+suffix+ngram-ckpt": SystemSpec("Aurora, eagle+suffix+ngram online from checkpoint", "aurora",
                                          "eagle:{ckpt}+suffix+ngram", online=True, needs_checkpoint=True),
    "eagle+suffix+ngram-adaptive-ckpt": SystemSpec(
        "Aurora, eagle+suffix+ngram online from checkpoint, adaptive tree policy", "aurora",
        "eagle:{ckpt}+suffix+ngram", online=True, needs_checkpoint=True, adaptive=True),
    "eagle+suffix-ckpt": SystemSpec("Aurora, eagle+suffix online from checkpoint", "aurora", "eagle:{ckpt}+suffix",
                                    online=True, needs_checkpoint=True),
    "compiled": SystemSpec("Aurora, no draft, compiled target", "aurora", "none", compile="on"),
    "compiled-int4": SystemSpec("Aurora, no draft, compiled int4 target", "aurora", "none", compile="on",
                                quantize="int4"),
    "ngram-compiled-int4": SystemSpec("Aurora, n-gram draft, compiled int4 target", "aurora", "ngram",
                                      compile="on", quantize="int4"),
    "online-compiled-int4": SystemSpec("Aurora, eagle+ngram online, compiled int4 target", "aurora",
                                       "eagle+ngram", online=True, compile="on", quantize="int4"),
    "llamacpp": SystemSpec("llama.cpp (llama-cpp-python), same GGUF", "llamacpp"),
    "llamacpp-ngram": SystemSpec("llama.cpp (llama-cpp-python), prompt lookup draft", "llamacpp", lookup=True),
}


@dataclass(frozen=True)
class BuildOptions:
    model: str = "smollm2-135m"
    dtype: str = "auto"
    device: str = "auto"
    checkpoint: str | None = None
    lookup_tokens: int = 10          # HF prompt_lookup_num_tokens
    kv_tokens: int = 8192
    threads: int = 0                 # torch threads for serving (0 = torch default)
    seed: int = 0
    prefix_cache: bool = True        # EngineConfig.prefix_cache of every Aurora system


@dataclass
class Output:
    token_ids: list[int]
    seconds: float
    tau: float | None                # tokens per target forward after prefill
    num_forwards: int | None = None  # decode-phase target forwards
    draft_version: int | None = None
    finish_reason: str | None = None
    ttft_s: float | None = None      # request start to first token (prefill), where the system knows


class System:
    """Base: `generate` one prompt; `pause`/`resume` background work; `extra` stats."""
    name = "base"
    label = ""

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> Output:
        raise NotImplementedError

    def mark(self) -> None:
        """Start of the measured window (after warm-up)."""

    def pause(self) -> None:
        """Stop background work (the trainer) while another system is measured."""

    def resume(self) -> None:
        pass

    def extra(self) -> dict:
        """System-level figures over the measured window (per-depth acceptance, trainer)."""
        return {}

    def close(self) -> None:
        pass


# ---------------------------------------------------------------- transformers

def load_hf_model(name: str, dtype: torch.dtype, device: torch.device):
    """The target weights as a plain transformers model (sdpa attention), loaded on its own."""
    from aurora.models import presets
    from aurora.models.loader import _GGUF_MODELS, ModelNotFound, _cached_gguf
    if name in presets.PRESETS:
        return presets.build(name, dtype, device)[0]
    from pathlib import Path

    from transformers import AutoModelForCausalLM
    path = _cached_gguf(name) if name in _GGUF_MODELS else Path(name).expanduser()
    if not (path / "config.json").exists():
        raise ModelNotFound(f"no HF checkpoint at {path}")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa",
                                                 local_files_only=True)
    return model.to(device).eval().requires_grad_(False)


def load_tokenizer(name: str):
    from aurora.models import presets
    if name in presets.PRESETS:
        from aurora.models.tokenizer import ByteTokenizer
        return ByteTokenizer()
    from pathlib import Path

    from transformers import AutoTokenizer

    from aurora.models.loader import _GGUF_MODELS, _cached_gguf
    path = _cached_gguf(name) if name in _GGUF_MODELS else Path(name).expanduser()
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


class HFSystem(System):
    """transformers `generate`; a forward hook counts target forwards to measure tau."""

    def __init__(self, name: str, spec: SystemSpec, opts: BuildOptions):
        from aurora.models.loader import resolve_device, resolve_dtype
        self.name, self.label = name, spec.label
        self.device = resolve_device(opts.device)
        # loaded and run on Aurora's compute thread: one OpenMP pool in the process, for both
        # systems (a second computing thread slows every pool's barriers; see engine/worker.py)
        self.compute = ComputeThread.get()
        self.model = self.compute.call(load_hf_model, opts.model, resolve_dtype(opts.dtype, self.device),
                                       self.device)
        self.lookup_tokens = opts.lookup_tokens if spec.lookup else 0
        self.threads = opts.threads
        self.num_forwards = 0
        self.model.register_forward_hook(self._count)
        self.pad_id = self.model.config.pad_token_id
        if self.pad_id is None:
            self.pad_id = 0

    def _count(self, *_):
        self.num_forwards += 1

    def generate(self, prompt_ids, params):
        return self.compute.call(self._generate, prompt_ids, params)

    def _generate(self, prompt_ids, params):
        x = torch.tensor([prompt_ids], device=self.device)
        kw = {"attention_mask": torch.ones_like(x), "max_new_tokens": params.max_tokens,
              "pad_token_id": self.pad_id, "eos_token_id": list(params.stop_token_ids) or None}
        if params.greedy:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kw.update(do_sample=True, temperature=params.temperature, top_p=params.top_p,
                      top_k=params.top_k or None)
            if params.seed is not None:
                torch.manual_seed(params.seed)
        if self.lookup_tokens:
            kw["prompt_lookup_num_tokens"] = self.lookup_tokens
        if self.threads:
            torch.set_num_threads(self.threads)              # as the engines' ticks do on this thread
        start_forwards = self.num_forwards
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(x, **kw)
        seconds = time.perf_counter() - t0
        new = out[0, len(prompt_ids):].tolist()
        decode_forwards = self.num_forwards - start_forwards - 1        # minus the prefill
        # tau counts decode-phase tokens per decode forward, as the engine does
        tau = (len(new) - 1) / decode_forwards if decode_forwards > 0 else None
        stop = set(params.stop_token_ids)
        reason = "stop" if new and new[-1] in stop else "length"
        return Output(new, seconds, tau, decode_forwards, None, reason)

    def close(self):
        self.model = None


# ---------------------------------------------------------------- Aurora

class AuroraSystem(System):
    """An `Engine` serving one request at a time; the flywheel (if online) trains behind it."""

    def __init__(self, name: str, config, label: str = ""):
        from aurora.engine.engine import Engine
        self.name, self.label = name, label or config.draft
        self.engine = Engine(config)
        if config.online and self.engine.flywheel is None:
            self.engine.close()
            raise Unavailable(f"draft {config.draft!r} has nothing to train online")
        self._mark = self._counters()

    @property
    def flywheel(self):
        return self.engine.flywheel

    def generate(self, prompt_ids, params):
        done = threading.Event()
        box: dict = {}

        def on_output(out):
            if out.finished:
                box["out"] = out
                done.set()
        t0 = time.perf_counter()
        self.engine.add_request(list(prompt_ids), params, on_output)
        if not done.wait(REQUEST_TIMEOUT_S):
            raise TimeoutError(f"{self.name}: request did not finish in {REQUEST_TIMEOUT_S:.0f}s")
        seconds = time.perf_counter() - t0
        out = box["out"]
        if out.finish_reason in ("error", "abort"):
            raise RuntimeError(f"{self.name}: request ended with {out.finish_reason}: {out.error}")
        st = out.stats or {}
        return Output(list(out.token_ids), seconds, st.get("accepted_length"), st.get("num_steps"),
                      st.get("draft_version"), out.finish_reason, st.get("ttft_s"))

    def _counters(self) -> tuple[list[int], list[int]] | None:
        st = getattr(self.engine, "_stats", None)        # raw counters, to window per-depth acceptance
        if st is None or not hasattr(st, "attempts"):
            return None
        return list(st.attempts), list(st.accepts)

    def mark(self):
        self._mark = self._counters()

    def pause(self):
        if self.flywheel is not None:
            self.flywheel.pause(wait=True)

    def resume(self):
        if self.flywheel is not None:
            self.flywheel.resume()

    def extra(self):
        stats = self.engine.stats()
        now = self._counters()
        if now is not None and self._mark is not None:
            (a0, c0), (a1, c1) = self._mark, now
            by_depth = {d: (c1[d] - c0[d]) / (a1[d] - a0[d]) for d in range(1, len(a1)) if a1[d] > a0[d]}
        else:
            by_depth = stats.get("acceptance_by_depth", {})
        out = {"acceptance_by_depth": {int(d): float(v) for d, v in by_depth.items()},
               "draft_s": stats.get("draft_s"), "verify_s": stats.get("verify_s"),
               "packed_linear_bytes": stats.get("packed_linear_bytes")}     # 0: this engine's linears stayed plain
        if isinstance(stats.get("draft_sources"), dict):
            out["draft_sources"] = stats["draft_sources"]
        policy = {k.removeprefix("policy_"): v for k, v in stats.items() if k.startswith("policy_")}
        if policy.get("adaptive"):                     # what the adaptive policy measured and decided
            out["policy"] = policy
        if isinstance(stats.get("trainer"), dict):
            t = stats["trainer"]
            out["trainer"] = {k: t.get(k) for k in ("steps", "loss", "losses", "swaps", "rollbacks", "version",
                                                     "tokens_trained", "prompt_rows_distilled", "busy_fraction",
                                                     "busy_share", "share_cuts", "error")
                              if k in t}
        return out

    def trainer_loss(self) -> float | None:
        t = self.engine.stats().get("trainer") or {}
        loss = t.get("loss")
        if loss is None and t.get("losses"):
            loss = sum(t["losses"].values())
        return loss

    def save_draft(self, path) -> str | None:
        return self.flywheel.save(path) if self.flywheel is not None else None

    def close(self):
        self.engine.close()


# ---------------------------------------------------------------- factory

def build_system(name: str, opts: BuildOptions) -> System:
    """One system by name (see `SYSTEMS`); raises `Unavailable` with a reason to skip it."""
    if name not in SYSTEMS:
        raise ValueError(f"unknown system {name!r}; choose from {', '.join(SYSTEMS)}")
    spec = SYSTEMS[name]
    if spec.needs_checkpoint and not opts.checkpoint:
        raise Unavailable("needs --checkpoint DIR (a saved draft)")
    if spec.kind == "hf":
        return HFSystem(name, spec, opts)
    if spec.kind == "llamacpp":
        from aurora.bench.peers import LlamaCppSystem
        return LlamaCppSystem(name, spec, opts)
    from aurora.config import EngineConfig, SpecConfig, TrainerConfig
    trainer = TrainerConfig(w_discard=0.5, w_counterfactual=0.5) if spec.discard else TrainerConfig()
    nodes = {"max_nodes": spec.tree_nodes, "suffix_max_depth": spec.tree_nodes} if spec.tree_nodes else {}
    config = EngineConfig(trainer=trainer, spec=SpecConfig(adaptive=spec.adaptive, ngram_depth=spec.ngram_depth,
                                                          policy_sources=spec.policy_sources,
                                                          policy_costs=spec.policy_costs, **nodes),
                          model=opts.model,
                          draft=spec.draft.format(ckpt=opts.checkpoint), online=spec.online, dtype=opts.dtype, device=opts.device,
                          kv_tokens=opts.kv_tokens, max_batch=1, threads=opts.threads, seed=opts.seed,
                          compile=spec.compile, quantize=spec.quantize, prefix_cache=opts.prefix_cache)
    try:
        return AuroraSystem(name, config, spec.label)
    except ImportError as exc:                     # flywheel module not there yet
        raise Unavailable(f"{type(exc).__name__}: {exc}") from exc

