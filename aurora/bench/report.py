"""Benchmark reports: results.json, a Markdown table and the tau-vs-request plot.

Plain functions over the results dict that `aurora.bench.run` builds, so they are
testable without a model. Every ratio in a report comes from one run.
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
from collections.abc import Sequence
from pathlib import Path


def rolling_mean(values: Sequence[float | None], window: int) -> list[float | None]:
    """Trailing mean over the last `window` values (fewer at the start); None values are
    skipped, and a window holding only None gives None."""
    if window < 1:
        raise ValueError("window must be >= 1")
    out = []
    for i in range(len(values)):
        chunk = [v for v in values[max(0, i - window + 1):i + 1] if v is not None]
        out.append(sum(chunk) / len(chunk) if chunk else None)
    return out


def median(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def hardware_line(threads: int = 0) -> str:
    """CPU model and count, torch version and serving threads, GPU if any, OS and Python."""
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fp:
            names = [ln.split(":", 1)[1].strip() for ln in fp if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    parts = [f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__} ({threads or torch.get_num_threads()} threads)"]
    if torch.cuda.is_available():
        parts.append(f"GPU {torch.cuda.get_device_name(0)}")
    parts.append(f"{platform.system()} {platform.release()}, Python {platform.python_version()}")
    return "; ".join(parts)


# ---------------------------------------------------------------- formatting

def fmt(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence], align: str | None = None) -> str:
    """A Markdown table with padded columns. `align`: one char per column, "l" or "r"
    (default: first column left, the rest right)."""
    cells = [[fmt(c) for c in row] for row in rows]
    if any(len(r) != len(headers) for r in cells):
        raise ValueError("every row needs one cell per header")
    align = align or "l" + "r" * (len(headers) - 1)
    widths = [max(3, len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]

    def line(row):
        padded = [c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align)]
        return "| " + " | ".join(padded) + " |"
    rule = "|" + "|".join((":" + "-" * (w + 1)) if a == "l" else ("-" * (w + 1) + ":")
                          for w, a in zip(widths, align)) + "|"
    return "\n".join([line(headers), rule, *(line(r) for r in cells)])


def fmt_depths(by_depth: dict | None, max_depth: int = 5) -> str:
    """Acceptance per draft position as "d1/d2/...", e.g. "0.71/0.52/0.40"."""
    if not by_depth:
        return "–"
    by_depth = {int(k): v for k, v in by_depth.items()}
    return "/".join(f"{by_depth[d]:.2f}" for d in range(1, max_depth + 1) if d in by_depth)


def fmt_exact(entry: dict) -> str:
    if entry.get("exact") is None:
        return "–"
    n, ok = entry.get("num_compared", 0), entry.get("num_exact", 0)
    return f"{'yes' if entry['exact'] else 'NO'} ({ok}/{n})"


TABLE_HEADERS = ("system", "tok/s", "speedup", "τ", "accept by depth", "exact", "serve s", "wall s")


def summary_rows(results: dict) -> list[list]:
    rows = []
    for name, s in results["systems"].items():
        speedup = s.get("speedup")
        rows.append([f"{name}: {s['label']}", s.get("tokens_per_s"),
                     f"{speedup:.2f}×" if speedup is not None else None, s.get("tau"),
                     fmt_depths(s.get("acceptance_by_depth")), fmt_exact(s), s.get("serve_s"),
                     s.get("wall_s")])
    return rows


def markdown_report(results: dict) -> str:
    meta = results["meta"]
    lines = [f"# Aurora bench — {meta['model']}", "",
             f"Hardware: {meta['hardware']}", "",
             (f"{meta['num_requests']} requests ({', '.join(meta['domains'])}; switches at "
             f"{meta['switches'] or 'none'}), max {meta['max_tokens']} tokens, "
             f"{'greedy' if meta['temperature'] == 0 else 'temperature ' + str(meta['temperature'])}, "
             f"dtype {meta['dtype']}, batch 1, served one at a time, {meta['warmup']} warm-up request(s) "
             f"per system not counted. Ratios from one run: every system ran in this process on the "
             f"same weights and prompts{' (interleaved request by request)' if meta.get('interleave') else ''}; "
             f"tok/s is the median over requests of output tokens / request wall time (prefill "
             f"included), speedup is that median over the `{results.get('reference') or '–'}` one."), "",
             format_table(TABLE_HEADERS, summary_rows(results)), ""]
    if results.get("skipped"):
        lines += ["Skipped: " + "; ".join(f"`{k}` ({v})" for k, v in results["skipped"].items()), ""]
    lines += [
        ("τ: mean accepted length, tokens emitted per target forward after prefill (transformers: "
        "generated tokens after the first / target forwards after prefill, counted by a forward hook). "
        "Accept by depth: fraction of drafts reaching position d−1 whose token d was accepted. "
        "Serve s: the measured requests; wall s adds loading and warm-up."), "",
        ("Exact: each greedy output compared token for token with transformers target-only greedy "
        "(same stop tokens). Where one side stops earlier (EOS, or max tokens), only the common prefix "
        "is compared; outputs count as exact when that prefix matches. fp32 is needed for this: in "
        "bf16 the paged attention and sdpa round differently and near-ties flip argmax."), ""]
    notes = meta.get("notes") or []
    if notes:
        lines += [*(f"* {n}" for n in notes), ""]
    lines.append(f"Total wall time {meta['wall_s']:.1f} s.")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- files

def write_json(results: dict, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(results, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(obj):
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)


def plot_tau(series: dict[str, dict], switches: Sequence[int], path: str | Path, title: str = "",
             window: int = 5, phases: Sequence[tuple[int, int, str]] = ()) -> Path:
    """Two panels over request index: tau (rolling mean, raw as faint dots) and tokens/s.
    `series`: name -> {"index": [...], "tau": [...], "tokens_per_s": [...], "label": str}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_tau, ax_tps) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for name, s in series.items():
        idx = s["index"]
        label = s.get("label") or name
        tau = s.get("tau") or []
        if any(t is not None for t in tau):
            pts = [(i, t) for i, t in zip(idx, tau) if t is not None]
            line, = ax_tau.plot(idx, rolling_mean(tau, window), label=label, lw=1.8)
            ax_tau.scatter([p[0] for p in pts], [p[1] for p in pts], s=8, alpha=0.25, color=line.get_color())
        tps = s.get("tokens_per_s") or []
        sparse = len(idx) < 2 or idx[-1] - idx[0] + 1 > len(idx)    # a sample: markers, no smoothing
        ax_tps.plot(idx, tps if sparse else rolling_mean(tps, window), label=label, lw=1.5,
                    marker="o" if sparse else None)
    for ax in (ax_tau, ax_tps):
        for x in switches:
            ax.axvline(x - 0.5, color="grey", ls="--", lw=1)
        ax.grid(alpha=0.3)
    top = ax_tau.get_ylim()[1]
    for start, _, label in phases:
        ax_tau.text(start, top, f" {label}", va="top", fontsize=9, color="dimgrey")
    ax_tau.set_ylabel(f"τ (accepted length, rolling mean {window})")
    ax_tps.set_ylabel(f"tokens/s (rolling mean {window})")
    ax_tps.set_xlabel("request index")
    ax_tau.legend(fontsize=8, loc="best")
    ax_tps.legend(fontsize=8, loc="best")
    if title:
        ax_tau.set_title(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_series(results: dict) -> dict[str, dict]:
    """Plot input from results.json: one entry per system with per-request figures."""
    out = {}
    for name, s in results["systems"].items():
        reqs = s.get("requests") or []
        out[name] = {"label": f"{name}", "index": [r["index"] for r in reqs],
                     "tau": [r.get("tau") for r in reqs],
                     "tokens_per_s": [r.get("tokens_per_s") for r in reqs]}
    return out
