"""The `aurora` command: `serve` (HTTP server), `export-draft`, and (forwarded) `bench`, `demo`
and `pretrain-draft`.

Forwarded commands hand their arguments to the `main(argv)` of `aurora.bench.cli`,
`aurora.bench.demo` and `aurora.flywheel.pretrain`, imported only when used, so a missing or broken module
breaks only its own subcommand. Heavy imports (torch, the engine) happen in `serve`.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time
from dataclasses import replace

FORWARDED = {"bench": ("aurora.bench.cli", "run benchmarks"),
             "demo": ("aurora.bench.demo", "run the live demo"),
             "pretrain-draft": ("aurora.flywheel.pretrain", "build a day-0 draft from installed corpora")}


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version
    try:
        return dist_version("aurora-spec")
    except PackageNotFoundError:                     # a bare checkout, not installed
        from aurora import __version__
        return __version__


def build_parser() -> argparse.ArgumentParser:
    from aurora.config import EngineConfig  # light: no torch
    parser = argparse.ArgumentParser(prog="aurora", description="Online speculative-decoding LLM engine.",
                                     epilog="Set AURORA_DEBUG=1 to see the traceback behind an error message.")
    parser.add_argument("--version", action="version", version=f"aurora {version()}")
    sub = parser.add_subparsers(dest="command", metavar="{serve,export-draft,bench,demo,pretrain-draft}")
    serve = sub.add_parser("serve", help="serve an OpenAI-compatible HTTP API",
                           description="Serve an OpenAI-compatible API (completions, chat, metrics) from one "
                                       "process with the engine embedded. Unset engine flags fall back to "
                                       "AURORA_<FIELD> environment variables, then EngineConfig defaults.")
    e = serve.add_argument_group("engine")
    d = EngineConfig()
    e.add_argument("--model", help=f"model preset or local checkpoint (default: {d.model})")
    e.add_argument("--draft", help=f"draft: none | ngram | suffix | eagle[:ckpt] | model:<path>, joined by '+' "
                                   f"(default: {d.draft})")
    e.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"),
                   help=f"default: {d.dtype} = bfloat16 on CUDA and on CPUs with native bf16, float32 otherwise")
    e.add_argument("--device", help=f"auto | cpu | cuda | cuda:N (default: {d.device})")
    e.add_argument("--online", action=argparse.BooleanOptionalAction, default=None,
                   help=f"train the draft online from served traffic, the flywheel "
                        f"(default: {'on' if d.online else 'off'})")
    e.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=None,
                   help="verify only the draft nodes that pay at the current load, switching speculation "
                        "off when it does not (SpecConfig.adaptive; with suffix+ngram it kept the fixed tree's "
                        "gain at 1 stream and avoided its losses at 16; docs/RESULTS.md, Concurrency sweep) "
                        f"(default: {'on' if d.spec.adaptive else 'off'})")
    s = serve.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1, loopback only)")
    s.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 = any free port)")
    s.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (default: $AURORA_API_KEY; prefer the env var, "
                        "command lines are visible to other users)")
    s.add_argument("--max-concurrent", type=int, default=64,
                   help="generation requests served at once; more get HTTP 429 (default: 64)")
    s.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default: 1 MiB)")
    s.add_argument("--save-dir", default=None,
                   help="directory where POST /v1/speculator {'action': 'save'} and shutdown save the draft")
    s.add_argument("--persist-draft", action=argparse.BooleanOptionalAction, default=True,
                   help="resume online learning from --save-dir (default: ~/.cache/aurora/drafts/<model>/) on "
                        "start and save there on shutdown (default: on; --no-persist-draft opts out)")
    s.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="seconds in-flight requests get to finish on SIGINT/SIGTERM (default: 10)")
    s.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True,
                   help="one log line per HTTP request: method, path, status, tokens, tau, TTFT, latency "
                        "(default: on)")
    s.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    x = sub.add_parser("export-draft", help="export an EAGLE draft for vLLM / SGLang",
                       description="Write a draft checkpoint as EAGLE-3 files: --format eagle3 (legacy "
                                   "LlamaForCausalLMEagle3 layout; SGLang) or speculators (vllm serve DIR).")
    x.add_argument("dir", help="output directory")
    x.add_argument("--format", default="eagle3", choices=("eagle3", "speculators"))
    x.add_argument("--model", help="target model preset or checkpoint (default: smollm2-135m)")
    x.add_argument("--draft-dir", help="Aurora draft checkpoint to export (default: the persisted draft "
                                       "of --model under ~/.cache/aurora/drafts/)")
    x.add_argument("--verifier", help="verifier name_or_path written into the files (default: the HF model "
                                      "the preset comes from, or the checkpoint path)")
    x.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    for name, (module, help_text) in FORWARDED.items():
        sub.add_parser(name, help=f"{help_text} (see 'aurora {name} --help')", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in FORWARDED:
        return _forward(argv[0], argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        if args.model is not None and not _model_ok("serve", args.model):
            return 2
        return _serve(args)
    if args.command == "export-draft":
        return _export(args)
    parser.print_help()
    return 2


def _model_ok(command: str, model: str) -> bool:
    """Check a --model before anything slow happens: one line and False for a bad one."""
    from aurora.models.loader import ModelNotFound, check_model
    try:
        check_model(model)
    except ModelNotFound as exc:
        print(f"aurora {command}: error: {exc}", file=sys.stderr)
        return False
    return True


def _model_arg(argv: list[str]) -> str | None:
    """The value of --model in a forwarded command line (None when absent or --help)."""
    if any(a in ("-h", "--help") for a in argv):
        return None
    probe = argparse.ArgumentParser(add_help=False)
    probe.add_argument("--model")
    return probe.parse_known_args(argv)[0].model


def _forward(command: str, argv: list[str]) -> int:
    """Run `aurora bench|demo`. User mistakes (ValueError, OSError: unknown model, bad
    option values, unwritable paths) end in one line and exit code 2, no traceback."""
    model = _model_arg(argv)
    if model is not None and not _model_ok(command, model):
        return 2
    if not any(a in ("-h", "--help") for a in argv):   # the next imports take seconds on a busy CPU
        print(f"aurora {command}: starting (importing transformers, reading prompts) ...", flush=True)
    module_name = FORWARDED[command][0]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        print(f"aurora {command}: unavailable, {module_name} could not be imported ({exc})", file=sys.stderr)
        return 2
    entry = getattr(module, "main", None)
    if not callable(entry):
        print(f"aurora {command}: {module_name} has no main(argv)", file=sys.stderr)
        return 2
    try:
        result = entry(argv)
    except (ValueError, OSError) as exc:
        if os.environ.get("AURORA_DEBUG"):
            raise
        print(f"aurora {command}: error: {exc} (AURORA_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"aurora {command}: interrupted", file=sys.stderr)
        return 130
    return result if isinstance(result, int) else 0


def _export(args: argparse.Namespace) -> int:
    from aurora.config import EngineConfig
    from aurora.flywheel.checkpoint import default_draft_dir, has_checkpoint
    try:
        config = EngineConfig.from_env(**({"model": args.model} if args.model else {}))
        src = os.path.abspath(os.path.expanduser(args.draft_dir)) if args.draft_dir else str(default_draft_dir(config.model))
        if not has_checkpoint(src) and not os.path.exists(os.path.join(src, "config.json")):
            raise ValueError(f"no draft checkpoint at {src} (serve with the flywheel first, or pass --draft-dir)")
        from aurora.engine.engine import Engine
        from aurora.flywheel.export import export_engine_draft
        config = EngineConfig.from_env(model=config.model, draft=f"eagle:{src}", online=False, device="cpu",
                                        dtype="float32")
        with Engine(config) as engine:
            info = export_engine_draft(engine, args.dir, args.format, args.verifier, args.dtype)
    except (ValueError, OSError) as exc:
        print(f"aurora export-draft: error: {exc}", file=sys.stderr)
        return 2
    print(f"exported draft v{info['version']} from {src} to {info['dir']} ({info['format']})", flush=True)
    return 0


def _serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from aurora.config import EngineConfig, ServerConfig

    overrides = {k: v for k, v in (("model", args.model), ("draft", args.draft), ("dtype", args.dtype),
                                   ("device", args.device), ("online", args.online)) if v is not None}
    save_dir = os.path.abspath(args.save_dir) if args.save_dir else None
    try:
        engine_config = EngineConfig.from_env(**overrides)
        if args.adaptive is not None:
            engine_config = replace(engine_config, spec=replace(engine_config.spec, adaptive=args.adaptive))
        if save_dir is None and args.persist_draft and engine_config.online:
            from aurora.flywheel.checkpoint import default_draft_dir
            save_dir = str(default_draft_dir(engine_config.model))
        server_config = ServerConfig(host=args.host, port=args.port,
                                     api_key=args.api_key or os.environ.get("AURORA_API_KEY") or None,
                                     max_concurrent=args.max_concurrent, max_body_bytes=args.max_body_bytes,
                                     save_dir=save_dir)
        if args.max_body_bytes < 1 or args.shutdown_timeout < 0:
            raise ValueError("--max-body-bytes must be >= 1 and --shutdown-timeout >= 0")
        if save_dir:
            os.makedirs(save_dir, exist_ok=True)
    except (ValueError, OSError) as exc:
        print(f"aurora serve: error: {exc}", file=sys.stderr)
        return 2
    print(f"loading model {engine_config.model} (draft {engine_config.draft}, "
          f"online {'on' if engine_config.online else 'off'}, "
          f"adaptive tree policy {'on' if engine_config.spec.adaptive else 'off'}) ...", flush=True)
    start = time.perf_counter()
    try:
        from aurora.engine.engine import Engine
        engine = Engine(engine_config)
    except Exception as exc:
        if os.environ.get("AURORA_DEBUG"):
            raise
        print(f"aurora serve: error: could not load the engine: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    trainer = "on" if engine.flywheel is not None else "off"
    imported = any(part.startswith("eagle:") for part in engine_config.draft.split("+"))
    if args.persist_draft and engine.flywheel is not None and save_dir and imported:
        print(f"starting from the given draft ({engine_config.draft}), not resuming from {save_dir}", flush=True)
    elif args.persist_draft and engine.flywheel is not None and save_dir:
        from aurora.flywheel.checkpoint import has_checkpoint
        if has_checkpoint(save_dir):
            try:
                info = engine.flywheel.load_state(save_dir)
            except (ValueError, OSError, RuntimeError) as exc:
                engine.close()
                print(f"aurora serve: error: cannot resume the draft from {save_dir}: {exc} "
                      "(use --no-persist-draft or another --save-dir)", file=sys.stderr)
                return 2
            print(f"resumed draft v{info['version']} (trainer step {info['steps']}) from {save_dir}", flush=True)
    print(f"loaded in {time.perf_counter() - start:.1f}s on {engine.device} (trainer {trainer})", flush=True)
    if server_config.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host} without an API key", file=sys.stderr, flush=True)
    from aurora.server.serve import serve
    return serve(engine, server_config, shutdown_timeout=args.shutdown_timeout, access_log=args.access_log)
