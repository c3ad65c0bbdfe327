"""The benchmark loop: same prompts, same weights, every system in one process.

Prompts are tokenized once and every system gets the same ids. Each system serves
them one at a time (batch 1) after warm-up requests that are not counted; systems run
one after another, or request by request with `interleave` (background trainers are
paused while another system is measured). Greedy outputs are checked against
transformers target-only greedy.
"""
from __future__ import annotations

import gc
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field

from aurora.bench import report
from aurora.bench.systems import (
    SYSTEMS,
    BuildOptions,
    Output,
    System,
    Unavailable,
    build_system,
    load_tokenizer,
)
from aurora.types import SamplingParams

log = logging.getLogger("aurora.bench")

REFERENCE = "hf"
DEFAULT_SYSTEMS = ("hf", "hf-lookup", "none", "ngram", "eagle", "online", "online-ckpt")
SUFFIX_SYSTEMS = ("hf", "hf-lookup", "none", "ngram", "suffix", "suffix+ngram", "eagle+suffix+ngram")


@dataclass(frozen=True)
class BenchConfig:
    model: str = "smollm2-135m"
    systems: tuple[str, ...] = DEFAULT_SYSTEMS
    domains: tuple[str, ...] = ("code", "finance", "chat")
    per_domain: int = 20
    requests: int | None = None         # cap on the total (default: per_domain * len(domains))
    max_tokens: int = 64
    warmup: int = 1
    temperature: float = 0.0
    seed: int = 0
    dtype: str = "auto"
    device: str = "auto"
    checkpoint: str | None = None
    lookup_tokens: int = 10
    max_prompt_chars: int | None = None  # default: 2000 real models, 300 tiny presets
    kv_tokens: int = 8192
    threads: int | None = None           # torch threads of every system; None = auto_threads()
    interleave: bool = False
    shared_history: bool = False         # multi-turn: every system gets the first system's replies
    prefix_cache: bool = True            # Aurora systems reuse the KV of prompt prefixes they served
    save_draft: str | None = None        # save the `online` system's draft here at the end
    notes: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self):
        unknown = [s for s in self.systems if s not in SYSTEMS]
        if unknown:
            raise ValueError(f"unknown systems {unknown}; choose from {', '.join(SYSTEMS)}")
        if not self.systems:
            raise ValueError("no systems selected")
        if self.per_domain < 1 or self.max_tokens < 1 or self.warmup < 0:
            raise ValueError("per_domain and max_tokens must be >= 1, warmup >= 0")
        if self.requests is not None and self.requests < 1:
            raise ValueError("requests must be >= 1")


def resolve_threads(threads: int | None, device: str = "auto") -> int:
    """Serving threads per system. Auto on CPU: every CPU left after `TrainerConfig.threads`
    (0 by default: the trainer takes turns with serving, `aurora/flywheel/share.py`, so nothing
    is oversubscribed), the same for every system so the comparison is fair. 0 = torch default (GPU)."""
    if threads is not None:
        return threads
    from aurora.config import TrainerConfig
    from aurora.models.loader import resolve_device
    if resolve_device(device).type != "cpu":
        return 0
    return max(1, (os.cpu_count() or 1) - TrainerConfig().threads)


# ---------------------------------------------------------------- prompts

def is_preset(model: str) -> bool:
    from aurora.models.presets import PRESETS
    return model in PRESETS


def default_max_chars(model: str) -> int:
    """Prompt length cap: tiny presets tokenize bytes and have short contexts."""
    return 300 if is_preset(model) else 2000


def load_prompts(cfg: BenchConfig):
    """Domain-shifting workload: per_domain of each domain in turn, capped at `requests`."""
    from aurora.workloads import domain_shift
    per = cfg.per_domain
    if cfg.requests is not None:
        per = math.ceil(cfg.requests / len(cfg.domains))
    max_chars = cfg.max_prompt_chars or default_max_chars(cfg.model)
    prompts = domain_shift(list(cfg.domains), per, seed=cfg.seed, max_chars=max_chars)
    return prompts[:cfg.requests] if cfg.requests is not None else prompts


def warmup_prompts(n: int, seed: int = 0):
    from aurora.workloads import tiny_prompts
    return tiny_prompts(n, seed=seed + 1000) if n else []


def encode(tokenizer, prompt) -> list[int]:
    """Chat prompts through the chat template (as a chat user sends them), others as text."""
    if prompt.messages and getattr(tokenizer, "chat_template", None):
        messages = prompt.messages
        if any(m["content"] is None for m in messages):     # multi-turn placeholders: empty replies
            from aurora.workloads import fill_history
            messages = fill_history(prompt, {})
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
    return list(tokenizer.encode(prompt.text, add_special_tokens=False))


def stop_ids(tokenizer, model: str) -> tuple[int, ...]:
    """EOS ids both sides stop at: the tokenizer's and the model config's."""
    ids = {tokenizer.eos_token_id} if getattr(tokenizer, "eos_token_id", None) is not None else set()
    if not is_preset(model):
        from transformers import AutoConfig

        from aurora.models.loader import _GGUF_MODELS, _cached_gguf
        path = _cached_gguf(model) if model in _GGUF_MODELS else model
        eos = AutoConfig.from_pretrained(path, local_files_only=True).eos_token_id
        ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return tuple(sorted(ids))


# ---------------------------------------------------------------- exactness

def compare(ref: list[int], out: list[int]) -> tuple[bool, int | None, bool]:
    """(match on the common prefix, first differing position, lengths differ)."""
    n = min(len(ref), len(out))
    first = next((i for i in range(n) if ref[i] != out[i]), None)
    return first is None, first, len(ref) != len(out)


def exactness(ref: list[Output], outs: list[Output]) -> dict:
    matches = [compare(r.token_ids, o.token_ids) for r, o in zip(ref, outs)]
    mismatched = [(i, m[1]) for i, m in enumerate(matches) if not m[0]]
    return {"exact": not mismatched, "num_compared": len(matches), "num_exact": len(matches) - len(mismatched),
            "num_length_differs": sum(m[2] for m in matches),
            "mismatches": [{"request": i, "first_diff_token": p} for i, p in mismatched[:20]]}


# ---------------------------------------------------------------- the run

def run_bench(cfg: BenchConfig, progress: bool = True) -> dict:
    """Run every selected system over the same prompts; return the results dict."""
    t_start = time.perf_counter()
    load_before = _load_avg()
    quiet_transformers()
    bench = _Bench(cfg, progress)
    bench.run_interleaved() if cfg.interleave else bench.run_sequential()
    bench.bar.close()
    results = assemble(cfg, bench.prompts, bench.prompt_ids, bench.runs, bench.skipped, bench.params)
    results["meta"]["wall_s"] = time.perf_counter() - t_start
    load = max(load_before, _load_avg())
    results["meta"]["load_avg"] = load
    if load > (os.cpu_count() or 1):
        results["meta"]["notes"].append(
            f"the machine was busy (1-minute load average up to {load:.1f} on {os.cpu_count()} CPUs): absolute "
            f"tokens/s are unreliable and per-request times noisy; ratios are less affected")
    return results


def _load_avg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


class _Bench:
    """Per-system bookkeeping of one run: start (load + warm-up), serve, finish, fail."""

    def __init__(self, cfg: BenchConfig, progress: bool):
        from tqdm import tqdm
        self.cfg = cfg
        self.opts = BuildOptions(model=cfg.model, dtype=cfg.dtype, device=cfg.device, checkpoint=cfg.checkpoint,
                                 lookup_tokens=cfg.lookup_tokens, kv_tokens=cfg.kv_tokens,
                                 threads=resolve_threads(cfg.threads, cfg.device), seed=cfg.seed,
                                 prefix_cache=cfg.prefix_cache)
        tokenizer = self.tokenizer = load_tokenizer(cfg.model)
        self.prompts = load_prompts(cfg)
        self.prompt_ids = [encode(tokenizer, p) for p in self.prompts]
        self.warm_ids = [encode(tokenizer, p) for p in warmup_prompts(cfg.warmup, cfg.seed)]
        self.params = SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature,
                                     seed=cfg.seed if cfg.temperature > 0 else None,
                                     stop_token_ids=stop_ids(tokenizer, cfg.model))
        order = sorted(cfg.systems, key=lambda n: n != REFERENCE)      # the reference first
        self.skipped = {n: "needs --checkpoint DIR (a saved draft)" for n in order
                        if SYSTEMS[n].needs_checkpoint and not cfg.checkpoint}
        self.order = [n for n in order if n not in self.skipped]
        self.runs: dict[str, dict] = {}
        self.bar = tqdm(total=len(self.order) * len(self.prompts), disable=not progress, unit="req",
                        dynamic_ncols=True)

    def run_sequential(self) -> None:
        for n in self.order:
            try:
                if self.start(n):
                    for i in range(len(self.prompts)):
                        self.serve(n, i)
                    self.finish(n)
            except Exception as exc:  # noqa: BLE001 -- one failing system must not lose the others
                self.fail(n, exc)

    def run_interleaved(self) -> None:
        """Request i on every system before request i+1; trainers of idle systems paused."""
        live = []
        for n in self.order:
            try:
                if self.start(n):
                    self.runs[n]["system"].pause()
                    live.append(n)
            except Exception as exc:  # noqa: BLE001 -- one failing system must not lose the others
                self.fail(n, exc)
        for i in range(len(self.prompts)):
            for n in list(live):
                try:
                    self.runs[n]["system"].resume()
                    self.serve(n, i)
                    self.runs[n]["system"].pause()
                except Exception as exc:  # noqa: BLE001 -- as above
                    self.fail(n, exc)
                    live.remove(n)
        for n in live:
            self.runs[n]["system"].resume()
            self.finish(n)

    def start(self, name: str) -> bool:
        self.bar.set_description(f"{name}: loading")
        t0 = time.perf_counter()
        try:
            system = build_system(name, self.opts)
        except Unavailable as exc:
            self.skipped[name] = str(exc)
            self.bar.total -= len(self.prompts)
            self.bar.refresh()
            return False
        self.runs[name] = {"system": system, "outputs": [], "wall_s": 0.0, "load_s": time.perf_counter() - t0}
        self.bar.set_description(f"{name}: warm-up")
        for ids in self.warm_ids:
            system.generate(ids, self.params)
        system.mark()
        self.runs[name]["wall_s"] += time.perf_counter() - t0
        return True

    def prompt_for(self, name: str, i: int) -> list[int]:
        """Token ids of request i for this system: a multi-turn request carries the replies this
        system produced for the conversation's earlier turns (as a chat client sends them), or,
        with `shared_history`, those of the first system (the reference when it runs), so every
        system serves the same prompts: bf16 near-ties make greedy replies of exact systems
        differ, and each difference would otherwise change all later turns' prompts."""
        prompt = self.prompts[i]
        if not prompt.conversation or not prompt.turn:
            return self.prompt_ids[i]
        from dataclasses import replace

        from aurora.workloads import fill_history
        source = self.order[0] if self.cfg.shared_history else name
        replies = self.runs[source].setdefault("replies", {}) if source in self.runs else {}
        return encode(self.tokenizer, replace(prompt, messages=fill_history(prompt, replies)))

    def serve(self, name: str, i: int) -> None:
        run = self.runs[name]
        ids = self.prompt_for(name, i)
        out = run["system"].generate(ids, self.params)
        run.setdefault("prompt_lens", {})[i] = len(ids)
        if self.prompts[i].conversation:
            text = self.tokenizer.decode(out.token_ids, skip_special_tokens=True)
            run.setdefault("replies", {})[(self.prompts[i].conversation, self.prompts[i].turn)] = text
        run["outputs"].append(out)
        run["wall_s"] += out.seconds
        self.bar.set_description(name)
        self.bar.set_postfix_str(f"τ {report.fmt(out.tau)} {len(out.token_ids) / out.seconds:.1f} tok/s")
        self.bar.update(1)

    def finish(self, name: str) -> None:
        run = self.runs[name]
        system: System = run.pop("system")
        run["extra"] = system.extra()
        if name == "online" and self.cfg.save_draft:
            run["extra"]["saved_draft"] = system.save_draft(self.cfg.save_draft)
        system.close()
        gc.collect()

    def fail(self, name: str, exc: Exception) -> None:
        log.exception("bench: system %s failed", name)
        self.skipped[name] = f"failed: {type(exc).__name__}: {exc}"
        run = self.runs.pop(name, None) or {"outputs": []}
        self.bar.total -= len(self.prompts) - len(run["outputs"])
        self.bar.refresh()
        if run.get("system") is not None:
            run["system"].close()


def assemble(cfg, prompts, prompt_ids, runs, skipped, params) -> dict:
    from aurora.workloads import switch_indices
    threads = resolve_threads(cfg.threads, cfg.device)
    ref_name = REFERENCE if REFERENCE in runs else ("none" if "none" in runs else None)
    ref_tps = None
    systems = {}
    for name, run in runs.items():
        outs: list[Output] = run["outputs"]
        tps = [len(o.token_ids) / o.seconds if o.seconds > 0 else None for o in outs]
        ttft = [o.ttft_s for o in outs]
        decode_tps = [(len(o.token_ids) - 1) / (o.seconds - o.ttft_s)    # after the first token
                      if o.ttft_s is not None and o.seconds > o.ttft_s and len(o.token_ids) > 1 else None
                      for o in outs]
        steps = sum(o.num_forwards or 0 for o in outs)
        decode_tokens = sum(max(0, len(o.token_ids) - 1) for o in outs)
        entry = {
            "label": SYSTEMS[name].label,
            "tokens_per_s": report.median(tps),
            "tokens_per_s_total": sum(len(o.token_ids) for o in outs) / max(1e-9, sum(o.seconds for o in outs)),
            "tau": decode_tokens / steps if steps else None,
            "ttft_s": report.median(ttft),
            "decode_tokens_per_s": report.median(decode_tps),
            "acceptance_by_depth": run.get("extra", {}).get("acceptance_by_depth") or None,
            "wall_s": run["wall_s"],
            "serve_s": sum(o.seconds for o in outs),
            "load_s": run.get("load_s"),
            "num_tokens": sum(len(o.token_ids) for o in outs),
            **{k: v for k, v in run.get("extra", {}).items() if k not in ("acceptance_by_depth",)},
            "requests": [{"index": i, "domain": prompts[i].domain, "source": prompts[i].source,
                          "prompt_tokens": run.get("prompt_lens", {}).get(i, len(prompt_ids[i])),
                          "tau": o.tau, "tokens": len(o.token_ids),
                          "seconds": o.seconds, "ttft_s": ttft[i], "tokens_per_s": tps[i], "draft_version": o.draft_version,
                          "finish_reason": o.finish_reason}
                         for i, o in enumerate(outs)],
        }
        if name == ref_name:
            ref_tps = entry["tokens_per_s"]
        systems[name] = entry
    for name, entry in systems.items():
        entry["speedup"] = entry["tokens_per_s"] / ref_tps if ref_tps and entry["tokens_per_s"] else None
        if params.greedy and REFERENCE in runs and name != REFERENCE:
            entry.update(exactness(runs[REFERENCE]["outputs"], runs[name]["outputs"]))
        else:
            entry["exact"] = None
    notes = list(cfg.notes)
    if params.greedy and REFERENCE not in runs:
        notes.append("exactness not checked: the transformers target-only system (`hf`) was not run")
    return {
        "meta": {"model": cfg.model, "dtype": _resolved_dtype(cfg), "device": cfg.device,
                 "threads": threads, "hardware": report.hardware_line(threads),
                 "num_requests": len(prompts), "max_tokens": cfg.max_tokens, "temperature": cfg.temperature,
                 "warmup": cfg.warmup, "domains": list(cfg.domains), "switches": switch_indices(prompts),
                 "interleave": cfg.interleave, "shared_history": cfg.shared_history,
                 "prefix_cache": cfg.prefix_cache,
                 "stop_token_ids": list(params.stop_token_ids),
                 "config": asdict(cfg), "notes": notes},
        "reference": ref_name,
        "systems": systems,
        "skipped": skipped,
    }


def _resolved_dtype(cfg: BenchConfig) -> str:
    from aurora.models.loader import resolve_device, resolve_dtype
    return str(resolve_dtype(cfg.dtype, resolve_device(cfg.device))).removeprefix("torch.")


def write_outputs(results: dict, out_dir) -> dict[str, str]:
    """results.json, results.md and tau.png under `out_dir`; returns their paths."""
    from pathlib import Path
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": report.write_json(results, out / "results.json")}
    md = out / "results.md"
    md.write_text(report.markdown_report(results))
    paths["md"] = md
    meta = results["meta"]
    window = max(1, min(5, meta["num_requests"] // 4 or 1))
    paths["png"] = report.plot_tau(report.plot_series(results), meta["switches"], out / "tau.png",
                                   title=f"{meta['model']}: τ and tokens/s per request", window=window,
                                   phases=_phases(results))
    return {k: str(v) for k, v in paths.items()}


def _phases(results) -> list[tuple[int, int, str]]:
    reqs = next((s["requests"] for s in results["systems"].values() if s.get("requests")), [])
    out, start = [], 0
    for i in range(1, len(reqs) + 1):
        if i == len(reqs) or reqs[i]["domain"] != reqs[start]["domain"]:
            out.append((start, i, reqs[start]["domain"]))
            start = i
    return out


def quiet_transformers() -> None:
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:                                # cosmetic only
        pass
