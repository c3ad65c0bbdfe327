"""`aurora bench`: transformers and Aurora systems side by side on the same weights and
prompts, in one process; writes results.json, results.md and tau.png into a new
directory per run (bench_out/<date-time>/), so runs never overwrite each other.

    aurora bench --quick
    aurora bench --stream --per-domain 100        (long real stream, see aurora/bench/stream.py)
    aurora bench --systems hf,none,online --domains code,chat --per-domain 10
    aurora bench --systems hf,hf-lookup,none,ngram,suffix,suffix+ngram,eagle+suffix+ngram --domains multiturn
    python -m aurora.bench.cli --model tiny-llama --requests 6 --max-tokens 16
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from aurora.bench.systems import SYSTEMS

QUICK = {"per_domain": 4, "max_tokens": 48}     # ~5 min for all systems on a 2-core CPU


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="aurora bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Benchmark Aurora against transformers on one machine, in one process.",
        epilog="systems:\n" + "\n".join(f"  {k:<12} {v.label}" for k, v in SYSTEMS.items())
        + "\n\nSystems needing --checkpoint are skipped (with a note) without one.")
    p.add_argument("--model", default="smollm2-135m", help="model name, tiny preset or HF dir (default: smollm2-135m)")
    p.add_argument("--systems", default=None,
                   help=f"comma-separated subset of {','.join(SYSTEMS)} (default: all)")
    p.add_argument("--domains", default="code,finance,chat",
                   help="domain order of the shifting workload; memory workloads: multiturn, templated, "
                        "related-code")
    p.add_argument("--per-domain", type=int, default=None, help="requests per domain (default: 20; --quick: 4)")
    p.add_argument("--requests", type=int, default=None, help="total requests (overrides --per-domain)")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens per request (default: 64; --quick: 48)")
    p.add_argument("--warmup", type=int, default=1, help="uncounted warm-up requests per system (default: 1)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default), checks exactness")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="auto (default) = bfloat16 on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX), "
                        "float32 on other CPUs; float32 is needed for token-exact comparisons")
    p.add_argument("--device", default="auto")
    p.add_argument("--checkpoint", default=None, help="saved draft dir for `eagle` and `online-ckpt`")
    p.add_argument("--save-draft", default=None, help="save the `online` system's draft here at the end")
    p.add_argument("--lookup-tokens", type=int, default=10, help="transformers prompt_lookup_num_tokens")
    p.add_argument("--max-prompt-chars", type=int, default=None,
                   help="longest prompt text (default: 2000; tiny presets: 300)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of every system's serving thread (default on CPU: every CPU, the same "
                        "for all systems; an online trainer takes turns with serving; 0 = torch default)")
    p.add_argument("--interleave", action="store_true",
                   help="serve request i on every system before request i+1 (fairer on a noisy "
                        "machine; trainers pause while other systems run)")
    p.add_argument("--shared-history", action="store_true",
                   help="multi-turn: every system's later turns carry the first system's replies (the "
                        "reference's when it runs), so all systems serve the same prompts")
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="Aurora systems recompute every prompt (EngineConfig.prefix_cache=False), for an A/B")
    p.add_argument("--quick", action="store_true", help="4 requests per domain x 48 tokens (~5 min on a 2-core CPU)")
    p.add_argument("--out", default=None,
                   help="directory for results.json, results.md and tau.png; must not hold an earlier run's "
                        "(default: a new bench_out/<date-time>[-<run-name>]/; bench_out/latest points at it)")
    p.add_argument("--run-name", default=None, help="suffix of the default run directory, e.g. 'quick-bf16'")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--replot", metavar="RESULTS_JSON", default=None,
                   help="only redraw the plot of an earlier run from its JSON (into tau.png beside it)")
    return p


def config_from_args(args):
    from aurora.bench.run import DEFAULT_SYSTEMS, BenchConfig
    systems = args.systems or ",".join(DEFAULT_SYSTEMS)
    per_domain = args.per_domain or (QUICK["per_domain"] if args.quick else 20)
    max_tokens = args.max_tokens or (QUICK["max_tokens"] if args.quick else 64)
    if args.checkpoint and not os.path.isdir(args.checkpoint):
        raise ValueError(f"--checkpoint {args.checkpoint!r} is not a directory (a draft saved with --save-draft)")
    return BenchConfig(
        model=args.model, systems=tuple(s.strip() for s in systems.split(",") if s.strip()),
        domains=tuple(d.strip() for d in args.domains.split(",") if d.strip()), per_domain=per_domain,
        requests=args.requests, max_tokens=max_tokens, warmup=args.warmup, temperature=args.temperature,
        seed=args.seed, dtype=args.dtype, device=args.device, checkpoint=args.checkpoint,
        lookup_tokens=args.lookup_tokens, max_prompt_chars=args.max_prompt_chars,
        threads=args.threads, interleave=args.interleave, shared_history=args.shared_history,
        save_draft=args.save_draft, prefix_cache=not args.no_prefix_cache)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--stream" in argv:                        # the long domain-shift stream (aurora/bench/stream.py)
        from aurora.bench.stream import main as stream_main
        return stream_main([a for a in argv if a != "--stream"])
    args = build_parser().parse_args(argv)
    if args.replot:
        print(f"wrote {replot(args.replot)}")
        return 0
    from aurora.bench.run import run_bench, write_outputs
    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        print(f"aurora bench: error: {exc}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    print(f"aurora bench: {cfg.model}, systems {','.join(cfg.systems)}, domains {','.join(cfg.domains)}, "
          f"max {cfg.max_tokens} tokens", flush=True)
    from aurora.bench.report import output_dir
    out_dir = output_dir(args.out, "bench_out", ("results.json", "results.md", "tau.png"), args.run_name)
    print(f"output: {out_dir}/", flush=True)
    results = run_bench(cfg, progress=not args.no_progress)
    paths = write_outputs(results, out_dir)
    from aurora.bench.report import markdown_report
    print()
    print(markdown_report(results))
    print(f"wrote {paths['json']}, {paths['md']}, {paths['png']} ({time.perf_counter() - t0:.1f} s)")
    return 0


def replot(json_path: str) -> str:
    """Redraw tau.png beside an earlier run's results JSON (the plot's numbers are the run's)."""
    import json
    from pathlib import Path

    from aurora.bench import report
    from aurora.bench.run import _phases
    path = Path(json_path)
    results = json.loads(path.read_text())
    meta = results["meta"]
    window = max(1, min(5, meta["num_requests"] // 4 or 1))
    return str(report.plot_tau(report.plot_series(results), meta["switches"], path.parent / "tau.png",
                               title=f"{meta['model']}: speedup and τ per request", window=window,
                               phases=_phases(results)))


if __name__ == "__main__":
    sys.exit(main())
