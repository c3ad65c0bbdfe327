"""Benchmark reports: results.json, a Markdown table and the plot (final speedups as
bars, tau per request with draft swaps marked, at most four systems per panel).

Plain functions over the results dict that `aurora.bench.run` builds, so they are
testable without a model. Every ratio in a report comes from one run.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

from aurora import progress


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


@contextlib.contextmanager
def heartbeat(what: str, every_s: float = 10.0, announce: bool = True):
    """Print "<what> ..." now (if `announce`), "... still <what> (N s)" every `every_s` seconds
    while the block runs, so a slow step (loading, warm-up on a busy CPU) never looks like a hang."""
    if announce:
        print(f"{what} ...", flush=True)
    with progress.heartbeat(lambda w, s: print(f"  ... still {w} ({s:.0f} s)", flush=True), what, every_s):
        yield


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


TABLE_HEADERS = ("system", "tok/s", "speedup", "τ", "TTFT s", "decode tok/s", "accept by depth", "exact", "serve s",
                 "wall s")


def summary_rows(results: dict) -> list[list]:
    rows = []
    for name, s in results["systems"].items():
        speedup = s.get("speedup")
        rows.append([f"{name}: {s['label']}", s.get("tokens_per_s"),
                     f"{speedup:.2f}×" if speedup is not None else None, s.get("tau"),
                     s.get("ttft_s"), s.get("decode_tokens_per_s"), fmt_depths(s.get("acceptance_by_depth")), fmt_exact(s), s.get("serve_s"),
                     s.get("wall_s")])
    return rows


def domain_rows(results: dict) -> tuple[tuple, list[list]] | None:
    """Per-domain table (None for one domain): each system's median / total tok/s and mean τ on
    that domain's requests, and its ratios over the baseline (the reference system, else the
    first listed) on the same requests."""
    systems = {n: s for n, s in results["systems"].items() if s.get("requests")}
    domains = list(dict.fromkeys(q["domain"] for s in systems.values() for q in s["requests"]))
    if len(domains) < 2 or not systems:
        return None
    base = results.get("reference") if results.get("reference") in systems else next(iter(systems))

    def stats(name: str, domain: str):
        reqs = [q for q in systems[name]["requests"] if q["domain"] == domain and q.get("seconds")]
        if not reqs:
            return None
        taus = [q["tau"] for q in reqs if q.get("tau") is not None]
        return (median([q["tokens"] / q["seconds"] for q in reqs]),
                sum(q["tokens"] for q in reqs) / sum(q["seconds"] for q in reqs),
                sum(taus) / len(taus) if taus else None, len(reqs))

    rows = []
    for domain in domains:
        b = stats(base, domain)
        row = [domain, b[3] if b else 0]
        for name in systems:
            st = stats(name, domain)
            if st is None:
                row.append("–")
                continue
            cell = f"{st[0]:.1f} / {st[1]:.1f}" + (f" (τ {st[2]:.2f})" if st[2] is not None else "")
            if name != base and b:
                cell += f": {st[0] / b[0]:.2f}× / {st[1] / b[1]:.2f}×"
            row.append(cell)
        rows.append(row)
    return ("domain", "requests", *systems), rows


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
    by_domain = domain_rows(results)
    if by_domain:
        headers, rows = by_domain
        base = results.get("reference") if results.get("reference") in headers else headers[2]
        lines += [(f"By domain: median / total tok/s (mean τ), then the ratios over `{base}` on the same "
                   "requests (median / total)."), "", format_table(headers, rows), ""]
    if results.get("skipped"):
        lines += ["Skipped: " + "; ".join(f"`{k}` ({v})" for k, v in results["skipped"].items()), ""]
    lines += [
        ("τ: mean accepted length, tokens emitted per target forward after prefill (transformers: "
        "generated tokens after the first / target forwards after prefill, counted by a forward hook). "
        "Accept by depth: fraction of drafts reaching position d−1 whose token d was accepted. "
        "TTFT s: median time to first token (prefill); decode tok/s: median of tokens after the first "
        "/ time after the first token (– where the system does not report its first token). "
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

def run_dir(base: str | Path, name: str | None = None) -> Path:
    """A new directory for one run, `<base>/<YYYYmmdd-HHMMSS>[-<name>]` (-2, -3... if taken),
    so runs never overwrite each other; `<base>/latest` points at it where links work."""
    base = Path(base)
    stem = time.strftime("%Y%m%d-%H%M%S") + (f"-{name}" if name else "")
    for k in range(1, 1000):
        path = base / (stem if k == 1 else f"{stem}-{k}")
        try:
            path.mkdir(parents=True)
            break
        except FileExistsError:
            continue
    else:
        raise OSError(f"no free run directory under {base}")
    latest = base / "latest"
    try:
        if latest.is_symlink():
            latest.unlink()
        if not latest.exists():
            latest.symlink_to(path.name, target_is_directory=True)
    except OSError:                                   # no symlinks here (some filesystems): cosmetic
        pass
    return path


def output_dir(out: str | None, default_base: str, files: Sequence[str], run_name: str | None = None) -> Path:
    """Where one run writes `files`. Without `out`: a new `<default_base>/<date-time>[-<run_name>]/`.
    With `out`: that directory, refused when it already holds one of `files` (an earlier
    run's output), so runs never overwrite each other."""
    if out is None:
        return run_dir(default_base, run_name)
    path = Path(out)
    taken = [f for f in files if (path / f).exists()]
    if taken:
        raise ValueError(f"--out {out} already holds {', '.join(taken)} from an earlier run; choose a new "
                         f"directory, or drop --out for a new {default_base}/<date-time>/")
    path.mkdir(parents=True, exist_ok=True)
    return path


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


MAX_PER_PANEL = 4          # more lines than this in one panel stop being readable


def swap_indices(index: Sequence[int], versions: Sequence[int | None]) -> list[int]:
    """Request indices served by a newer draft version than the request before (a hot swap,
    or a rollback, landed in between)."""
    out, prev = [], None
    for i, v in zip(index, versions):
        if v is not None and prev is not None and v != prev:
            out.append(i)
        prev = v if v is not None else prev
    return out


def panel_groups(names: Sequence[str], size: int = MAX_PER_PANEL) -> list[list[str]]:
    """Split `names` (in order) into the fewest panels of at most `size`, balanced."""
    names = list(names)
    if not names:
        return []
    k = math.ceil(len(names) / size)
    per = math.ceil(len(names) / k)
    return [names[i:i + per] for i in range(0, len(names), per)]


def _learns(s: dict) -> bool:
    """A series worth a tau line: tau varies somewhere (target-only systems sit at 1)."""
    return any(t is not None and abs(t - 1.0) > 1e-9 for t in s.get("tau") or [])


def plot_layout(series: dict[str, dict]) -> tuple[list[str], list[list[str]], list[list[str]]]:
    """(systems in the speedup bar chart, systems per tau panel, systems per tokens/s panel)."""
    names = list(series)
    with_tau = [n for n in names if any(t is not None for t in series[n].get("tau") or [])]
    tau_groups = panel_groups([n for n in with_tau if _learns(series[n])] or with_tau)
    bars = [n for n in names if series[n].get("speedup") is not None]
    tps_groups = [] if bars else panel_groups([n for n in names if series[n].get("tokens_per_s")])
    return bars, tau_groups, tps_groups


def plot_tau(series: dict[str, dict], switches: Sequence[int], path: str | Path, title: str = "",
             window: int = 5, phases: Sequence[tuple[int, int, str]] = ()) -> Path:
    """Tau (rolling mean, raw as faint dots, draft swaps as triangles) and tokens/s over
    request index, at most four systems per panel.
    `series`: name -> {"index", "tau", "tokens_per_s", "label", optional "draft_version"
    (per request: swaps are marked) and "speedup" (then one bar chart of final speedups
    replaces the tokens/s panels)}. Systems whose tau is 1 throughout get no tau line
    (unless no system's tau moves)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(series)
    colors = {n: f"C{i % 10}" for i, n in enumerate(names)}
    bars, tau_groups, tps_groups = plot_layout(series)
    heights = ([0.6 + 0.32 * len(bars)] if bars else []) + [3.0] * (len(tau_groups) + len(tps_groups))
    fig, axes = plt.subplots(len(heights), 1, figsize=(10, sum(heights) + 0.6), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    axes = list(axes[:, 0])
    if bars:
        _bar_panel(axes.pop(0), [(series[n].get("label") or n, series[n]["speedup"], colors[n]) for n in bars])
    for k, group in enumerate(tau_groups):
        _tau_panel(axes[k], {n: series[n] for n in group}, colors, window, phases, switches)
    for k, group in enumerate(tps_groups):
        ax = axes[len(tau_groups) + k]
        for n in group:
            s = series[n]
            idx, tps = s["index"], s.get("tokens_per_s") or []
            sparse = len(idx) < 2 or idx[-1] - idx[0] + 1 > len(idx)    # a sample: markers, no smoothing
            ax.plot(idx, tps if sparse else rolling_mean(tps, window), label=s.get("label") or n, lw=1.5,
                    marker="o" if sparse else None, color=colors[n])
        _decorate(ax, switches, f"tokens/s (rolling mean {window})")
    line_axes = axes[:len(tau_groups) + len(tps_groups)]
    if line_axes:
        from matplotlib.ticker import MaxNLocator
        for ax in line_axes[1:]:
            ax.sharex(line_axes[0])
        line_axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
        line_axes[-1].set_xlabel("request index")
    fig.suptitle(title or "τ per request")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _decorate(ax, switches, ylabel: str) -> None:
    for x in switches:
        ax.axvline(x - 0.5, color="grey", ls="--", lw=1)
    ax.grid(alpha=0.3)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def _tau_panel(ax, group: dict[str, dict], colors, window, phases, switches) -> None:
    swapped = False
    for name, s in group.items():
        idx, tau = s["index"], s.get("tau") or []
        smooth = rolling_mean(tau, window)
        ax.plot(idx, smooth, label=s.get("label") or name, lw=1.8, color=colors[name])
        pts = [(i, t) for i, t in zip(idx, tau) if t is not None]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=8, alpha=0.25, color=colors[name])
        swaps = set(swap_indices(idx, s.get("draft_version") or []))
        marks = [(i, y) for i, y in zip(idx, smooth) if i in swaps and y is not None]
        if marks:
            swapped = True
            ax.scatter([m[0] for m in marks], [m[1] for m in marks], marker="v", s=40, color=colors[name],
                       edgecolors="black", linewidths=0.6, zorder=3)
    ax.axhline(1.0, color="black", lw=0.8, alpha=0.5)
    if swapped:
        ax.scatter([], [], marker="v", s=40, color="white", edgecolors="black", linewidths=0.6,
                   label="new draft version served")
    top = max(ax.get_ylim()[1], 1.2)
    ax.set_ylim(top=top * 1.06)
    for start, _, label in phases:
        ax.text(start, top * 1.05, f" {label}", va="top", fontsize=9, color="dimgrey")
    _decorate(ax, switches, f"τ (accepted length,\nrolling mean {window})")


def _bar_panel(ax, bars: list[tuple[str, float, str]]) -> None:
    """Horizontal bars of final speedups, the best at the top, labelled with their value."""
    labels, values, colors = zip(*bars)
    ys = range(len(bars))[::-1]
    ax.barh(list(ys), values, color=colors, alpha=0.85)
    ax.set_yticks(list(ys), labels, fontsize=8)
    ax.axvline(1.0, color="black", lw=0.8)
    for y, v in zip(ys, values):
        ax.text(v, y, f" {v:.2f}×", va="center", fontsize=8)
    ax.set_xlim(0, max(values) * 1.15)
    ax.set_xlabel("speedup: median tokens/s over the reference (1.0 = reference)")
    ax.grid(alpha=0.3, axis="x")


def plot_series(results: dict) -> dict[str, dict]:
    """Plot input from results.json: one entry per system with per-request figures."""
    out = {}
    for name, s in results["systems"].items():
        reqs = s.get("requests") or []
        label = f"{name} (reference)" if name == results.get("reference") else name
        out[name] = {"label": label, "index": [r["index"] for r in reqs],
                     "tau": [r.get("tau") for r in reqs],
                     "tokens_per_s": [r.get("tokens_per_s") for r in reqs],
                     "draft_version": [r.get("draft_version") for r in reqs],
                     "speedup": s.get("speedup")}
    return out
