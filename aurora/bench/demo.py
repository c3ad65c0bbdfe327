"""`aurora demo`: the flywheel live. An engine starts from a learned draft (default `--system
online`: eagle+ngram; `eagle+suffix+ngram[-adaptive]` adds the traffic memory), untrained or,
with `--checkpoint DIR`, the day-0 draft `aurora pretrain-draft` saved there (`make demo` passes
it once `make draft` built it), serves a domain-shifting workload (code -> finance ->
chat) one request at a time and learns from it; one console line per request, a per-phase
summary (tau early vs late), and the tau plot.

Speedups come from baselines served interleaved: engines with no draft and with prompt lookup
alone (`ngram`) stay loaded, and every k-th request is served by them right after the learning
engine served it (its trainer paused meanwhile), so a slow or fast stretch of the machine falls
on all three alike. speedup = median over those requests of tok/s(learning) / tok/s(baseline).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

DEFAULT_REQUESTS = 45
DEFAULT_MAX_TOKENS = 48
# `aurora bench` systems that learn online -> the same system starting from --checkpoint
ONLINE_SYSTEMS = {"online": "online-ckpt", "eagle+suffix+ngram": "eagle+suffix+ngram-ckpt",
                  "eagle+suffix+ngram-adaptive": "eagle+suffix+ngram-adaptive-ckpt",
                  "eagle+suffix": "eagle+suffix-ckpt"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aurora demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--requests", type=int, default=None,
                   help=f"requests in total (default: $DEMO_REQUESTS or {DEFAULT_REQUESTS})")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    p.add_argument("--domains", default="code,finance,chat", help="phases in order")
    p.add_argument("--baseline", type=int, default=15,
                   help="requests also served with no draft and with `ngram`, each right after the learning "
                        "engine, for the speedups (0 = skip; default 15, every third; more samples, a steadier median)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None,
                   help="serving torch threads (default on CPU: every CPU; the trainer takes turns with serving)")
    p.add_argument("--system", default="online", choices=tuple(ONLINE_SYSTEMS),
                   help="the learning system, an `aurora bench` name (default online = eagle+ngram with "
                        "the fixed tree, the fastest of these in this demo on a 2-core CPU; docs/RESULTS.md)")
    p.add_argument("--load", type=float, default=1.0,
                   help="fraction of wall time spent serving (default 1.0: back to back); below 1 the demo "
                        "waits after each request so that serving takes this share, as arrivals would "
                        "on a server with idle time, and the trainer learns in the gaps")
    p.add_argument("--checkpoint", default=None,
                   help="start the learned draft from this saved draft (e.g. the day-0 draft of `aurora "
                        "pretrain-draft`; `make demo` passes ~/.cache/aurora/drafts/<model>-day0 once `make draft` "
                        "built it) instead of from scratch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-draft", default=None, help="save the learned draft here at the end")
    p.add_argument("--out", default=None,
                   help="directory for demo.json and demo_tau.png; must not hold an earlier run's "
                        "(default: a new demo_out/<date-time>/; demo_out/latest points at it)")
    return p


def _requests(args) -> int:
    if args.requests is not None:
        return args.requests
    env = os.environ.get("DEMO_REQUESTS", "").strip()
    return int(env) if env else DEFAULT_REQUESTS


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        n = _requests(args)
        if n < 1 or args.max_tokens < 1 or args.baseline < 0:
            raise ValueError("--requests and --max-tokens must be >= 1, --baseline >= 0")
        if not 0.05 <= args.load <= 1:
            raise ValueError("--load must be in [0.05, 1]")
        if args.checkpoint is not None:
            args.checkpoint = checked_checkpoint(args.checkpoint)
    except ValueError as exc:
        print(f"aurora demo: error: {exc}", file=sys.stderr)
        return 2
    from aurora.bench import report
    from aurora.bench.run import (
        default_max_chars,
        encode,
        quiet_transformers,
        resolve_threads,
        stop_ids,
        warmup_prompts,
    )
    from aurora.bench.systems import (
        SYSTEMS,
        BuildOptions,
        Unavailable,
        build_system,
        load_tokenizer,
    )
    from aurora.types import SamplingParams
    from aurora.workloads import domain_shift, segments, switch_indices

    t_start = time.perf_counter()
    out_dir = report.output_dir(args.out, "demo_out", ("demo.json", "demo_tau.png"))   # never overwrites a run
    quiet_transformers()
    domains = [d.strip() for d in args.domains.split(",") if d.strip()]
    prompts = domain_shift(domains, math.ceil(n / len(domains)), seed=args.seed,
                           max_chars=default_max_chars(args.model))[:n]
    tokenizer = load_tokenizer(args.model)
    prompt_ids = [encode(tokenizer, p) for p in prompts]
    warm_ids = [encode(tokenizer, p) for p in warmup_prompts(1, args.seed)]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0,
                            stop_token_ids=stop_ids(tokenizer, args.model))
    threads = resolve_threads(args.threads, args.device)
    opts = BuildOptions(model=args.model, dtype=args.dtype, device=args.device, threads=threads, seed=args.seed,
                        checkpoint=args.checkpoint)
    system = ONLINE_SYSTEMS[args.system] if args.checkpoint else args.system
    draft = SYSTEMS[system].draft.format(ckpt=args.checkpoint)
    start = f"from the saved draft {args.checkpoint}" if args.checkpoint else "from scratch"
    print(f"aurora demo: {args.model}, draft {draft} learning online {start}; {n} requests "
          f"({' -> '.join(domains)}), {args.max_tokens} tokens each, greedy, batch 1, "
          + ("back to back" if args.load >= 1 else f"serving {args.load:.0%} of the time (the trainer "
             "learns in the gaps)"), flush=True)
    if args.checkpoint:
        from aurora.flywheel.pretrain import older_recipe_note
        note = older_recipe_note(args.checkpoint)
        if note:
            print(f"aurora demo: {note}", flush=True)
    try:
        with report.heartbeat("loading the engine (target, draft, trainer)"):
            online = build_system(system, opts)
    except Unavailable as exc:
        print(f"aurora demo: the online draft is unavailable here: {exc}", file=sys.stderr)
        return 1
    baselines = {}
    try:
        for name in ("none", "ngram") if args.baseline else ():
            with report.heartbeat(f"loading the {name!r} baseline engine"):
                baselines[name] = build_system(name, opts)
        with report.heartbeat("warm-up request (not counted)"):
            for eng in (online, *baselines.values()):
                for ids in warm_ids:
                    eng.generate(ids, params)
        online.mark()
        idx = set(baseline_indices(n, args.baseline))
        print(f"engines ready in {time.perf_counter() - t_start:.1f} s; serving (requests {sorted(idx)} also "
              "with no draft and with ngram, right after)\n" if idx else
              f"engine ready in {time.perf_counter() - t_start:.1f} s; serving\n", flush=True)

        rows, base, base_ngram = [], {}, {}
        t_serve = time.perf_counter()
        for i, ids in enumerate(prompt_ids):
            with report.heartbeat(f"serving #{i}", announce=False):     # a line every 10 s on a slow CPU
                out = online.generate(ids, params)
            tps = len(out.token_ids) / out.seconds
            loss = online.trainer_loss()
            rows.append({"index": i, "domain": prompts[i].domain, "tau": out.tau, "tokens": len(out.token_ids),
                         "seconds": out.seconds, "tokens_per_s": tps, "draft_version": out.draft_version,
                         "loss": loss})
            line = (f"#{i:<3d} {prompts[i].domain:<8} τ {report.fmt(out.tau)}  {tps:5.1f} tok/s  "
                    f"draft v{out.draft_version}  loss {report.fmt(loss)}")
            if i in idx:                                   # same prompt, same minute, trainer paused
                online.pause()
                try:
                    base[i], base_ngram[i] = (served_tps(baselines[k], ids, params) for k in ("none", "ngram"))
                finally:
                    online.resume()
                line += f"   | no draft {base[i]:5.1f} tok/s, ngram {base_ngram[i]:5.1f} tok/s"
            print(line, flush=True)
            if args.load < 1:                              # idle until serving is `load` of wall time
                time.sleep(out.seconds * (1 / args.load - 1))
        serve_wall = time.perf_counter() - t_serve             # serving plus baselines and --load gaps
        extra = online.extra()
        if args.save_draft:
            extra["saved_draft"] = online.save_draft(args.save_draft)
    finally:
        for eng in (online, *baselines.values()):
            eng.close()
    del online

    phases = segments(prompts)
    summary = phase_summary(rows, phases)
    print()
    print(report.format_table(("phase", "requests", "τ early", "τ late", "tok/s early", "tok/s late", "draft"),
                              summary))
    ratios = [rows[i]["tokens_per_s"] / tps for i, tps in base.items()]
    speedup = report.median(ratios)
    trainer = extra.get("trainer") or {}
    print(f"\nτ overall {report.fmt(report.mean([r['tau'] for r in rows]))}; acceptance by depth "
          f"{report.fmt_depths(extra.get('acceptance_by_depth'))}; trainer: {trainer.get('steps', 0)} steps, "
          f"{trainer.get('swaps', 0)} swaps, {trainer.get('rollbacks', 0)} rollbacks, "
          f"loss {report.fmt(trainer.get('loss'))}, computed {_pct(trainer.get('busy_fraction'))} of wall time "
          f"(busy share at the end {_pct(trainer.get('busy_share'))}, cut {trainer.get('share_cuts') or 0}×)")
    src = extra.get("draft_sources") or {}
    if "learned_gain" in src:
        print(f"learned branch: +{src['learned_gain']:.2f} accepted tokens per step for a cost of "
              f"{src['learned_cost']:.2f} (target-step units); gate {'open' if src.get('gate_open') else 'closed'} "
              "at the end — the rest of τ comes from the draft's training-free parts")
        groups = {g: v for g, v in (src.get("by_coverage") or {}).items() if v.get("share")}
        if groups:
            print("  by step: " + "; ".join(
                f"{'nothing else proposed' if g == 'none' else _matched(g)} "
                f"({100 * v['share']:.0f}% of steps): "
                f"+{v['gain']:.2f} for {v['cost']:.2f}, gate {'open' if v['gate_open'] else 'closed'}"
                for g, v in groups.items()))
    third = max(1, len(rows) // 3)
    tau_early = report.mean([r["tau"] for r in rows[:third]])
    tau_late = report.mean([r["tau"] for r in rows[-third:]])
    print(f"τ first third {report.fmt(tau_early)} → last third {report.fmt(tau_late)}")
    speedup_ngram = report.median([rows[i]["tokens_per_s"] / tps for i, tps in base_ngram.items()])
    if base:
        print(f"speedup over plain decoding (no draft, same {len(base)} prompts, each served right after; "
              f"trainer's CPU cost included): {report.fmt(speedup)}× median (requests {sorted(base)})")
    if base_ngram:
        print(f"speedup over the n-gram draft alone (same prompts): {report.fmt(speedup_ngram)}× median")
        why = verdict(speedup, speedup_ngram, tau_early, tau_late, trainer, extra.get("draft_sources"), args.load,
                      saved=args.checkpoint is not None)
        if why:
            print(why)
    if extra.get("saved_draft"):
        print(f"draft saved to {extra['saved_draft']}")

    series = {"online": {"label": f"{draft} online", "index": [r["index"] for r in rows],
                         "tau": [r["tau"] for r in rows], "tokens_per_s": [r["tokens_per_s"] for r in rows],
                         "draft_version": [r["draft_version"] for r in rows]}}
    if base:
        series["none"] = {"label": "no draft (baseline sample)", "index": sorted(base), "tau": [],
                          "tokens_per_s": [base[i] for i in sorted(base)]}
    png = report.plot_tau(series, switch_indices(prompts), out_dir / "demo_tau.png",
                          title=f"Aurora flywheel on {args.model}: τ per request", window=5, phases=phases)
    wall = time.perf_counter() - t_start
    (out_dir / "demo.json").write_text(json.dumps(
        {"model": args.model, "system": args.system, "draft": draft, "checkpoint": args.checkpoint, "load": args.load,
         "hardware": report.hardware_line(threads), "max_tokens": args.max_tokens,
         "requests": rows, "phases": [list(p) for p in phases], "baseline_tokens_per_s": base,
         "speedup": speedup, "speedup_over_ngram": speedup_ngram, "baseline_ngram_tokens_per_s": base_ngram,
         "tau_first_third": tau_early, "tau_last_third": tau_late, "stats": extra,
         "serve_wall_s": serve_wall, "wall_s": wall}, indent=2, default=str) + "\n")
    print(f"plot: {png.resolve()}\ndone in {wall:.0f} s")
    return 0


def checked_checkpoint(path: str) -> str:
    """`path` expanded, or ValueError saying how to build a draft there."""
    from pathlib import Path

    from aurora.flywheel.checkpoint import has_checkpoint
    p = Path(path).expanduser()
    if not has_checkpoint(p):
        from aurora.flywheel.pretrain import DEFAULT_CONVS, DEFAULT_STEPS, eta_text
        raise ValueError(f"--checkpoint {path}: no saved draft there (config.json + draft.safetensors); "
                         f"`aurora pretrain-draft --out {path}` builds a day-0 draft "
                         f"({eta_text(DEFAULT_CONVS, DEFAULT_STEPS)})")
    return str(p)


FEW_STEPS = 10        # optimizer steps below which a saved draft's speedup is not learning's


def verdict(speedup, speedup_ngram, tau_early, tau_late, trainer: dict, sources: dict | None,
            load: float = 1.0, saved: bool = False) -> str | None:
    """One line saying why learning has not paid yet; when it pays from a `saved` draft the
    trainer barely changed, one saying so; else None."""
    steps = trainer.get("steps", 0) or 0
    pays = speedup is not None and speedup_ngram is not None and speedup > 1.0 and speedup_ngram >= 1.0
    if saved and steps < FEW_STEPS:                  # the saved draft served, barely trained
        why = (f"the trainer made {steps} optimizer steps (a saved draft earns its share of busy serving from "
               "min_busy_share; docs/RESULTS.md, Trainer overhead)")
        if pays:
            return f"what pays here is the saved draft: {why}"
        return (f"the saved draft did not pay in this run, and it is what served: {why}; its edge over prompt "
                "lookup on these prompts is a few per cent, within the spread between runs (docs/RESULTS.md)")
    if pays:
        return None
    gain, cost = (sources or {}).get("learned_gain", 0), (sources or {}).get("learned_cost", 0)
    share = trainer.get("busy_share")
    share_note = f" (busy share {100 * share:.0f}% at the end)" if share is not None else ""
    if load >= 1 and gain > cost:
        return (f"learning has not paid yet: the learned branch pays per step (+{gain:.2f} accepted tokens for "
                f"{cost:.2f}), but back to back the trainer's {steps} steps take their CPU share from serving"
                f"{share_note} (docs/RESULTS.md, Trainer overhead); `--load 0.6` leaves it idle time, as a server has")
    if steps < 50:
        return (f"learning has not paid yet: the trainer made only {steps} optimizer steps in this demo{share_note} "
                "(too little traffic and idle time to learn from); a draft from scratch needs hundreds: start from "
                "the day-0 draft (`make draft`, then `make demo`)")
    if tau_early is not None and tau_late is not None and tau_late <= tau_early:
        return f"learning has not paid yet: τ did not rise ({tau_early:.2f} → {tau_late:.2f}) after {steps} steps"
    if sources and gain <= cost:
        return (f"learning has not paid yet: the learned branch adds {gain:.2f} accepted "
                f"tokens/step but costs {cost:.2f} (gate mostly closed; n-gram carries it)")
    return (f"learning has not paid yet: τ rose ({tau_early:.2f} → {tau_late:.2f}) but not enough to beat "
            "the draft's own cost on this CPU")


def _matched(group: str) -> str:
    """'match1' -> 'lookup matched 1 token', 'match3+' -> 'lookup matched 3+ tokens'."""
    n = group[len("match"):]
    return f"lookup matched {n} token{'' if n == '1' else 's'}"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def baseline_indices(n: int, k: int) -> list[int]:
    """`k` request indices spread evenly over `n` (first and last included)."""
    if k <= 0:
        return []
    return sorted({round(j * (n - 1) / max(1, k - 1)) for j in range(min(k, n))})


def served_tps(system, ids: list[int], params) -> float:
    out = system.generate(ids, params)
    return len(out.token_ids) / out.seconds


def phase_summary(rows: list[dict], phases) -> list[list]:
    """Per domain phase: mean tau and median tokens/s over its first and second half."""
    from aurora.bench.report import mean, median
    table = []
    for start, stop, label in phases:
        part = rows[start:stop]
        half = max(1, len(part) // 2)
        early, late = part[:half], part[half:] or part[-1:]
        versions = [r["draft_version"] for r in part if r["draft_version"] is not None]
        table.append([f"{label} #{start}-{stop - 1}", len(part),
                      mean([r["tau"] for r in early]), mean([r["tau"] for r in late]),
                      median([r["tokens_per_s"] for r in early]), median([r["tokens_per_s"] for r in late]),
                      f"v{min(versions)}→v{max(versions)}" if versions else None])
    return table


if __name__ == "__main__":
    sys.exit(main())
