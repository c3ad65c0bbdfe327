"""The `aurora` command as a user meets it: `--version`, help texts that match the code's
defaults, and one clear line (no traceback) with a non-zero exit for every mistake.
Each case runs the real command in a subprocess.
"""
import subprocess
import sys

import pytest
import torch

from aurora import __version__
from aurora.bench.cli import build_parser as bench_parser
from aurora.bench.demo import build_parser as demo_parser
from aurora.cli import build_parser


def aurora(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "aurora", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


def assert_one_line_error(proc, command: str, *needles: str):
    assert proc.returncode != 0, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "huggingface" not in proc.stderr.lower(), proc.stderr
    assert lines[0].startswith(f"aurora {command}: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_version():
    proc = aurora("--version", timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"aurora {__version__}", proc


@pytest.mark.parametrize("command", ["demo", "bench", "serve"])
def test_unknown_model_is_one_line(command):
    proc = aurora(command, "--model", "does-not-exist")
    assert_one_line_error(proc, command, "unknown model 'does-not-exist'", "never downloads")
    assert proc.stdout == ""                                   # the one line is all the user sees


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["demo", "bench"])
def test_missing_device_is_one_line(command):
    proc = aurora(command, "--model", "tiny-llama", "--device", "cuda", "--requests", "1", "--max-tokens", "1")
    assert_one_line_error(proc, command, "CUDA is not available")


def test_serve_missing_device_is_one_line():
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    proc = aurora("serve", "--model", "tiny-llama", "--device", "cuda", "--port", "0")
    assert proc.returncode != 0
    err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("aurora serve: error:") and "CUDA" in err[0], proc.stderr


def test_bench_missing_checkpoint_is_one_line(tmp_path):
    proc = aurora("bench", "--model", "tiny-llama", "--checkpoint", str(tmp_path / "nope"))
    assert_one_line_error(proc, "bench", "--checkpoint")


def test_bench_unknown_system_is_one_line():
    proc = aurora("bench", "--model", "tiny-llama", "--systems", "hf,warp-drive")
    assert_one_line_error(proc, "bench", "warp-drive")


def test_demo_bad_count_is_one_line():
    proc = aurora("demo", "--model", "tiny-llama", "--requests", "0")
    assert_one_line_error(proc, "demo", "--requests")


def _help(parser, dest):
    return next(a.help for a in parser._actions if a.dest == dest)


def test_help_texts_match_defaults():
    from aurora.config import EngineConfig
    from aurora.models.loader import DEFAULT_MODEL, resolve_dtype
    assert "bfloat16 on CUDA and on CPUs with native bf16" in _help(bench_parser(), "dtype")
    assert bench_parser().get_default("dtype") == "auto" and EngineConfig().dtype == "auto"
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16         # what the help says
    assert f"default: {DEFAULT_MODEL}" in _help(bench_parser(), "model")
    assert bench_parser().get_default("model") == DEFAULT_MODEL == demo_parser().get_default("model")
    serve = next(a for a in build_parser()._actions if a.dest == "command").choices["serve"]
    d = EngineConfig()
    assert f"default: {d.model}" in _help(serve, "model") and f"default: {d.draft}" in _help(serve, "draft")
    assert f"default: {d.device}" in _help(serve, "device") and f"default: {d.dtype} = bfloat16" in _help(serve, "dtype")
    assert ("default: on" if d.online else "default: off") in _help(serve, "online")
    assert "default: 8000" in _help(serve, "port") and serve.get_default("port") == 8000
    assert "default: 64" in _help(serve, "max_concurrent") and serve.get_default("max_concurrent") == 64
    assert "default: on" in _help(serve, "access_log") and serve.get_default("access_log") is True


def test_no_arguments_prints_help():
    proc = aurora(timeout=60)
    assert proc.returncode == 2 and "serve" in proc.stdout and "bench" in proc.stdout
