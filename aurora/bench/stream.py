"""`aurora bench --stream`: a long stream of real requests with abrupt domain shifts.

All systems are alive at once and serve the stream interleaved, request by request (request i
on each system in turn), at batch 1, each request followed by an idle gap that holds
utilisation at `--utilization` (an open-loop arrival approximation: after a request of d
seconds the system waits d * (1/u - 1)). Only the serving system's trainer runs, in its
request and its own gap, so no system's trainer takes the CPU from another's serving.
`--sequential` serves the whole stream on one system after another instead (a slow drift of
the machine then falls on some systems only). Systems: none, ngram, eagle+ngram online from scratch, eagle+ngram
online from a saved draft (`online-ckpt --checkpoint DIR`, e.g. the corpus day-0 draft) and the
same draft frozen (`frozen-ckpt`), eagle online alone (from scratch or `eagle-online-ckpt`), eagle
static (online on the first domain, then frozen), and the full composition online from the saved
draft (`online-ckpt-suffix`: eagle+suffix+ngram). Reports per-window
tau and tok/s, trainer steps and swaps; the last third of each domain (with a 95 % paired
bootstrap interval of each ratio over ngram's tok/s: the same requests resampled for both systems,
ratio of total tokens over total seconds, so one run says how far its ratio could be luck); requests until
eagle+ngram online beats ngram in tok/s and until eagle alone beats ngram in tau; and a
plot of tau and tok/s vs request index with swaps marked.

    aurora bench --stream --per-domain 100
    python -m aurora.bench.stream --model tiny-llama --per-domain 4 --max-tokens 16
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import NamedTuple

BOOTSTRAP_REPS = 2000      # resamples behind each ratio's 95 % interval


class StreamSystem(NamedTuple):
    label: str
    draft: str                 # EngineConfig.draft; "{ckpt}" stands for --checkpoint
    online: bool
    over_ngram: bool = False   # the summary divides its tok/s by ngram's, per domain
    beats: str = ""            # "tok_s" | "tau": the summary counts requests until it beats ngram on it
    key: str = ""              # that count's name: requests_until_<key>_beats_ngram_<beats> (default: the system's)
    gate: str = "coverage"     # SpecConfig.learned_gate


STREAM_SYSTEMS = {
    "none": StreamSystem("Aurora, no draft", "none", False),
    "ngram": StreamSystem("Aurora, n-gram draft", "ngram", False),
    "online": StreamSystem("eagle+ngram online from scratch", "eagle+ngram", True, True, "tok_s"),
    "online-ckpt": StreamSystem("eagle+ngram online from --checkpoint (e.g. the corpus day-0 draft)",
                                "eagle:{ckpt}+ngram", True, True, "tok_s"),
    "frozen-ckpt": StreamSystem("eagle+ngram from --checkpoint, frozen (never trained on the stream)",
                                "eagle:{ckpt}+ngram", False, True),
    "frozen-ckpt-1gate": StreamSystem("frozen-ckpt with one learned gate for all steps "
                                      "(SpecConfig(learned_gate='single'))", "eagle:{ckpt}+ngram", False, True,
                                      gate="single"),
    "online-ckpt-1gate": StreamSystem("online-ckpt with one learned gate for all steps", "eagle:{ckpt}+ngram",
                                      True, True, gate="single"),
    "eagle-online": StreamSystem("eagle online alone", "eagle", True, beats="tau", key="eagle"),
    "eagle-online-ckpt": StreamSystem("eagle online alone, from --checkpoint", "eagle:{ckpt}", True,
                                      beats="tau", key="eagle_ckpt"),
    "online-ckpt-suffix": StreamSystem("eagle+suffix+ngram online from --checkpoint", "eagle:{ckpt}+suffix+ngram",
                                       True, True, "tok_s"),
    "eagle-static": StreamSystem("eagle trained on the first domain, then frozen", "eagle", True),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aurora bench --stream", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--systems", default=",".join(STREAM_SYSTEMS))
    p.add_argument("--domains", default="code,finance,chat")
    p.add_argument("--per-domain", type=int, default=100, help="requests per domain (default 100: 300 in all)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--utilization", type=float, default=0.6, help="fraction of wall time serving (0, 1]")
    p.add_argument("--window", type=int, default=10, help="requests per reported window")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-prompt-chars", type=int, default=1200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", default=None,
                   help="saved draft dir for online-ckpt and frozen-ckpt (`aurora pretrain-draft` writes a day-0 one)")
    p.add_argument("--sequential", action="store_true",
                   help="serve the whole stream on one system after another (default: interleaved, request "
                        "by request, so machine drift falls on every system alike)")
    p.add_argument("--out", default="stream_out")
    return p


def _engine(name: str, args):
    from aurora import Engine, EngineConfig
    from aurora.config import SpecConfig
    system = STREAM_SYSTEMS[name]
    spec = SpecConfig(learned_gate=system.gate)
    return Engine(EngineConfig(model=args.model, draft=system.draft.replace("{ckpt}", args.checkpoint or ""),
                               online=system.online, dtype=args.dtype, max_batch=1, seed=args.seed, spec=spec))


def _serve_one(eng, i: int, prompt, args) -> dict:
    """One request on one engine, then its idle gap (an online system's trainer works in it)."""
    from aurora import SamplingParams
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    out = eng.generate_batch([prompt.text[:args.max_prompt_chars]], params)[0]
    dt = time.perf_counter() - t0
    stats = eng.stats()
    tr = stats.get("trainer") or {}
    by_coverage = (stats.get("draft_sources") or {}).get("by_coverage") or {}   # the learned gate, per group
    if args.utilization < 1:
        time.sleep(dt * (1 / args.utilization - 1))
    return {"i": i, "domain": prompt.domain, "tokens": len(out.token_ids), "seconds": dt,
            "ttft_s": out.stats.get("ttft_s"),
            "tau": out.stats.get("accepted_length"), "draft_version": out.stats.get("draft_version"),
            "steps": tr.get("steps", 0), "swaps": tr.get("swaps", 0),
            "tokens_trained": tr.get("tokens_trained", 0),
            "gate": {g: {k: v[k] for k in ("share", "gain", "cost", "gate_open", "depth")}
                     for g, v in by_coverage.items()}}


def _frozen_now(name: str, i: int, shift_at: list[int]) -> bool:
    return name == "eagle-static" and bool(shift_at) and i >= shift_at[0]    # frozen after the first domain


def _progress(progress, name: str, i: int, n: int, rows: list[dict], args) -> None:
    if progress and (i + 1) % args.window == 0:
        progress(f"  {name}: {i + 1}/{n} requests, tau {rows[-1]['tau']}, "
                 f"steps {rows[-1]['steps']}, swaps {rows[-1]['swaps']}")


def serve_stream(name: str, prompts, args, shift_at: list[int], progress=print) -> list[dict]:
    """Serve every prompt on one system; one row per request."""
    eng = _engine(name, args)
    rows = []
    try:
        for i, prompt in enumerate(prompts):
            if _frozen_now(name, i, shift_at) and eng.flywheel is not None:
                eng.flywheel.pause()
            rows.append(_serve_one(eng, i, prompt, args))
            _progress(progress, name, i, len(prompts), rows, args)
    finally:
        eng.close()
    return rows


def serve_interleaved(names: list[str], prompts, args, shift_at: list[int], progress=print) -> dict[str, list[dict]]:
    """Every system alive at once, request by request: request i goes to each system in turn, so
    a slow or fast stretch of the machine falls on all of them alike. Only the serving system's
    trainer runs (the others are paused), during its request and its own idle gap; the pause
    waits for a unit of work under way, so the next system's first token never waits for it."""
    engines: dict[str, object] = {}
    try:
        for name in names:
            engines[name] = _engine(name, args)
            if engines[name].flywheel is not None:
                engines[name].flywheel.pause()
        runs: dict[str, list[dict]] = {name: [] for name in names}
        for i, prompt in enumerate(prompts):
            for name, eng in engines.items():
                fw = eng.flywheel
                if fw is not None and not _frozen_now(name, i, shift_at):
                    fw.resume()
                try:
                    runs[name].append(_serve_one(eng, i, prompt, args))
                finally:
                    if fw is not None:
                        fw.pause(wait=True)
                _progress(progress, name, i, len(prompts), runs[name], args)
        return runs
    finally:
        for eng in engines.values():
            eng.close()


def windows(rows: list[dict], size: int) -> list[dict]:
    out = []
    for s in range(0, len(rows), size):
        w = rows[s:s + size]
        taus = [r["tau"] for r in w if r["tau"] is not None]
        out.append({"start": s, "end": s + len(w), "domain": w[0]["domain"],
                     "tau": sum(taus) / len(taus) if taus else None,
                     "tok_s": _tok_s(w),
                     "steps": w[-1]["steps"], "swaps": w[-1]["swaps"]})
    return out


def summarize(runs: dict[str, list[dict]], shift_at: list[int], n: int, window: int) -> dict:
    bounds = [0] + shift_at + [n]
    domains = []
    for a, b in zip(bounds, bounds[1:]):
        last = range(a + 2 * (b - a) // 3, b)
        d = {"domain": next(iter(runs.values()))[a]["domain"], "requests": [a, b]}
        for name, rows in runs.items():
            sel = [rows[i] for i in last]
            d[name] = {"tok_s": _tok_s(sel),
                       "tau": _mean(r["tau"] for r in sel),
                       "ttft_s": _mean(r.get("ttft_s") for r in sel),
                       "tau_start": _mean(r["tau"] for r in rows[a:a + max(1, (b - a) // 3)]),
                       "steps_end": rows[b - 1]["steps"]}
        for name, rows in runs.items():
            if STREAM_SYSTEMS[name].over_ngram and "ngram" in d:
                d[f"{name}_over_ngram_tok_s"] = d[name]["tok_s"] / max(1e-9, d["ngram"]["tok_s"])
                d[f"{name}_over_ngram_tok_s_ci95"] = ratio_interval(rows, runs["ngram"], last)
        domains.append(d)
    out = {"domains": domains}
    if "ngram" in runs:
        ng = windows(runs["ngram"], window)
        for name, rows in runs.items():
            system = STREAM_SYSTEMS[name]
            if system.beats:
                key = system.key or name.replace("-", "_")
                out[f"requests_until_{key}_beats_ngram_{system.beats}"] = next(
                    (w["end"] for w, g in zip(windows(rows, window), ng)
                     if (w[system.beats] or 0) > (g[system.beats] or 0)), None)
    return out


def ratio_interval(rows: list[dict], base: list[dict], idx, reps: int = BOOTSTRAP_REPS,
                   seed: int = 0) -> list[float]:
    """95 % paired bootstrap interval of tok/s(rows) / tok/s(base) over the requests `idx`:
    each resample draws request indices with replacement and takes both systems' rows at them
    (interleaved serving gave both the same prompts at nearly the same time), tok/s = total
    tokens / total seconds, as the point estimate."""
    idx = list(idx)
    if not idx:
        return [float("nan"), float("nan")]
    rng = random.Random(seed)
    ratios = []
    for _ in range(reps):
        pick = [idx[rng.randrange(len(idx))] for _ in idx]
        ratios.append(_tok_s([rows[i] for i in pick]) / max(1e-9, _tok_s([base[i] for i in pick])))
    ratios.sort()
    return [ratios[int(0.025 * (reps - 1))], ratios[int(0.975 * (reps - 1))]]


def ratio_lines(summary: dict) -> list[str]:
    """One line per domain and system over ngram: the last third's tok/s ratio, its 95 % interval,
    tau of both, and the system's trainer steps at the domain's end."""
    lines = []
    for d in summary["domains"]:
        for key, ratio in d.items():
            if not key.endswith("_over_ngram_tok_s"):
                continue
            name = key.removesuffix("_over_ngram_tok_s")
            lo, hi = d.get(key + "_ci95", [float("nan")] * 2)
            tau, tau_ng = d[name]["tau"], d["ngram"]["tau"]
            lines.append(f"{d['domain']}, last third: {name} / ngram {ratio:.3f}x (95 % interval {lo:.3f}-{hi:.3f}), "
                         f"tau {tau or 0:.2f} vs {tau_ng or 0:.2f}, {d[name]['steps_end']} trainer steps")
    return lines


def _tok_s(rows: list[dict]) -> float:
    """Total tokens / total seconds of served requests."""
    return sum(r["tokens"] for r in rows) / max(1e-9, sum(r["seconds"] for r in rows))


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def plot(runs: dict[str, list[dict]], window: int, shift_at: list[int], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_tau, ax_tps) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for name, rows in runs.items():
        ws = windows(rows, window)
        xs = [(w["start"] + w["end"]) / 2 for w in ws]
        line, = ax_tau.plot(xs, [w["tau"] for w in ws], label=name)
        ax_tps.plot(xs, [w["tok_s"] for w in ws], label=name, color=line.get_color())
        swaps = [r["i"] for a, r in zip(rows, rows[1:]) if r["swaps"] > a["swaps"]]
        ax_tau.plot(swaps, [ax_tau.get_ylim()[0]] * len(swaps), "|", color=line.get_color(), markersize=8)
    for ax in (ax_tau, ax_tps):
        for s in shift_at:
            ax.axvline(s, color="gray", linestyle="--", linewidth=0.8)
    ax_tau.set_ylabel("tau (tokens / step)")
    ax_tps.set_ylabel("tok/s")
    ax_tps.set_xlabel("request index (| = draft swap, dashed = domain shift)")
    ax_tau.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if not 0 < args.utilization <= 1 or args.per_domain < 1 or args.window < 1:
        print("aurora bench --stream: error: need 0 < utilization <= 1, per-domain >= 1, window >= 1",
              file=sys.stderr)
        return 2
    from aurora.workloads import domain_shift
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in STREAM_SYSTEMS]
    if unknown:
        print(f"aurora bench --stream: error: unknown systems {unknown}; choose from {list(STREAM_SYSTEMS)}",
              file=sys.stderr)
        return 2
    needing = [s for s in systems if "{ckpt}" in STREAM_SYSTEMS[s].draft]
    if needing and not args.checkpoint:
        print(f"aurora bench --stream: error: {', '.join(needing)}: --checkpoint DIR is required "
              "(`aurora pretrain-draft --out DIR` builds a day-0 draft)", file=sys.stderr)
        return 2
    domains = [d.strip() for d in args.domains.split(",") if d.strip()]
    prompts = domain_shift(domains, args.per_domain, seed=args.seed)
    shift_at = [i for i in range(1, len(prompts)) if prompts[i].domain != prompts[i - 1].domain]
    print(f"aurora bench --stream: {len(prompts)} requests ({' -> '.join(domains)}), systems {systems}, "
          f"utilization {args.utilization}", flush=True)
    say = lambda m: print(m, flush=True)                                  # noqa: E731
    if args.sequential:
        runs = {name: serve_stream(name, prompts, args, shift_at, progress=say) for name in systems}
    else:
        runs = serve_interleaved(systems, prompts, args, shift_at, progress=say)
    results = {"config": vars(args), "shift_at": shift_at,
               "windows": {k: windows(v, args.window) for k, v in runs.items()},
               "summary": summarize(runs, shift_at, len(prompts), args.window), "rows": runs}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "stream.json").write_text(json.dumps(results, indent=1))
    plot(runs, args.window, shift_at, out / "stream.png")
    print(json.dumps(results["summary"], indent=1))
    for line in ratio_lines(results["summary"]):
        print(line)
    print(f"wrote {out / 'stream.json'}, {out / 'stream.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
