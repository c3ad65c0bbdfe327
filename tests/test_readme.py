"""Every code block in README.md runs, in order, as a user would paste it.

`python` blocks run as scripts; `bash`/`sh` blocks run through bash with a few stand-ins
defined first: `aurora` (also `.venv/bin/aurora`, `python -m aurora`) is this install's
command, with `aurora serve` started in the background until the end of the README and
`aurora demo|bench` made short; `make` only prints what it would do (`make -n`); `curl`
fails on HTTP errors. The default model is swapped for the tiny preset and port 8000 for
a free one (a slow variant keeps the real model). Blocks in other languages (diagrams,
sample output) are not code. A block may opt out only for a GPU or the network, with an
HTML comment on the line before it: `<!-- readme-test: skip (needs network: ...) -->`.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RUNNABLE = {"python": "python", "py": "python", "bash": "bash", "sh": "bash", "shell": "bash"}
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\s*\((?P<reason>[^)]*)\)\s*-->")
REAL_MODEL, TINY_MODEL = "smollm2-135m", "tiny-llama"
BLOCK_TIMEOUT_S = 600
SERVER_START_S = 300
# `aurora demo|bench` as written take minutes; these flags come last and win (argparse)
SHORT_RUNS = {"demo": "--requests 2 --max-tokens 4 --baseline 1",
              "bench": "--requests 2 --max-tokens 4 --no-progress"}

PRELUDE = r'''
set -eo pipefail
aurora() {
    case "${1:-}" in
        serve)
            local n=0
            while [ -e "$AURORA_README_DIR/server-$n.pid" ]; do n=$((n + 1)); done
            local log="$AURORA_README_DIR/server-$n.log"
            "$AURORA_BIN/aurora" "$@" > "$log" 2>&1 &
            echo $! > "$AURORA_README_DIR/server-$n.pid"
            for _ in $(seq "$AURORA_SERVER_START_S"); do
                if grep -q "listening on" "$log"; then return 0; fi
                if ! kill -0 $! 2>/dev/null; then cat "$log" >&2; echo "aurora serve exited" >&2; return 1; fi
                sleep 1
            done
            cat "$log" >&2; echo "aurora serve did not start listening" >&2; return 1 ;;
        demo) "$AURORA_BIN/aurora" "$@" $AURORA_SHORT_DEMO ;;
        bench) "$AURORA_BIN/aurora" "$@" $AURORA_SHORT_BENCH ;;
        *) "$AURORA_BIN/aurora" "$@" ;;
    esac
}
make() { command make -n -C "$AURORA_REPO" "$@"; }
curl() { command curl --fail-with-body --max-time 300 "$@"; }
'''


@dataclass
class Block:
    lang: str           # "python" | "bash" | anything else (not run)
    text: str
    line: int           # 1-based line of the opening fence
    skip: str | None    # reason given by an opt-out marker

    @property
    def runnable(self) -> bool:
        return self.lang in RUNNABLE


def readme_blocks(text: str) -> list[Block]:
    """Fenced code blocks of a Markdown text with their language and opt-out marker."""
    blocks, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^(```+|~~~+)\s*([\w+-]*)", lines[i])
        if not m:
            i += 1
            continue
        fence, lang, start = m.group(1), m.group(2).lower(), i
        i += 1
        body = []
        while i < len(lines) and not lines[i].startswith(fence):
            body.append(lines[i])
            i += 1
        if i >= len(lines):
            raise AssertionError(f"README.md:{start + 1}: unclosed code fence")
        prev = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = SKIP.search(prev)
        blocks.append(Block(RUNNABLE.get(lang, lang), "\n".join(body) + "\n", start + 1,
                            marker.group("reason").strip() if marker else None))
        i += 1
    return blocks


def adapt(text: str, port: int, tiny: bool) -> str:
    """What the test changes in a block: the port, the model, the ways to call `aurora`."""
    text = re.sub(r"\b8000\b", str(port), text)
    if tiny:
        text = text.replace(REAL_MODEL, TINY_MODEL)
    text = re.sub(r"(?<![\w/.-])(?:\./)?\.venv/bin/aurora\b", "aurora", text)
    return re.sub(r"\bpython3? -m aurora\b", "aurora", text)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_readme(tmp_path: Path, tiny: bool) -> list[str]:
    """Run every runnable README block in order; returns a log of what ran."""
    blocks = readme_blocks(README.read_text())
    work = tmp_path / "cwd"
    work.mkdir()
    state = tmp_path / "state"
    state.mkdir()
    (work / ".venv").symlink_to(sys.prefix, target_is_directory=True)    # `.venv/bin/...`, `source .venv/...`
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
           "AURORA_BIN": str(bindir), "AURORA_REPO": str(ROOT), "AURORA_README_DIR": str(state),
           "AURORA_SERVER_START_S": str(SERVER_START_S),
           "AURORA_SHORT_DEMO": SHORT_RUNS["demo"], "AURORA_SHORT_BENCH": SHORT_RUNS["bench"],
           "PYTHONUNBUFFERED": "1"}
    port = free_port()
    ran = []
    try:
        for b in blocks:
            if not b.runnable:
                continue
            where = f"README.md:{b.line} ({b.lang} block)"
            if b.skip is not None:
                ran.append(f"skipped {where}: {b.skip}")
                continue
            code = adapt(b.text, port, tiny)
            if b.lang == "python":
                script = state / f"block_{b.line}.py"
                script.write_text(code)
                cmd = [sys.executable, str(script)]
            else:
                script = state / f"block_{b.line}.sh"
                script.write_text(PRELUDE + code)
                cmd = ["bash", str(script)]
            t0 = time.monotonic()
            proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True,
                                  timeout=BLOCK_TIMEOUT_S, check=False)
            if proc.returncode != 0:
                raise AssertionError(f"{where} failed (exit {proc.returncode}):\n--- block as run:\n{code}"
                                     f"--- stdout:\n{proc.stdout[-4000:]}\n--- stderr:\n{proc.stderr[-4000:]}")
            ran.append(f"ran {where} in {time.monotonic() - t0:.1f} s")
    finally:
        ran += _stop_servers(state)
    return ran


def _stop_servers(state: Path) -> list[str]:
    """SIGINT every server the README started; each must shut down cleanly (exit 0)."""
    out = []
    for pid_file in sorted(state.glob("server-*.pid")):
        pid = int(pid_file.read_text())
        log = pid_file.with_suffix(".log")
        try:
            os.kill(pid, signal.SIGINT)
        except ProcessLookupError:
            raise AssertionError(f"aurora serve died early:\n{log.read_text()[-4000:]}") from None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:            # servers are grandchildren: poll, no waitpid
            if not _alive(pid):
                break
            time.sleep(0.2)
        else:
            os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"aurora serve did not stop on SIGINT:\n{log.read_text()[-4000:]}")
        text = log.read_text()
        assert "stopped" in text, text[-4000:]
        out.append(f"stopped server {pid_file.stem}: {len(re.findall('aurora.access', text))} access-log lines")
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:                               # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


# ---------------------------------------------------------------- tests
def test_readme_blocks_parse():
    blocks = readme_blocks(README.read_text())
    runnable = [b for b in blocks if b.runnable]
    assert sum(b.lang == "python" for b in runnable) >= 2 and sum(b.lang == "bash" for b in runnable) >= 3
    for b in runnable:
        if b.skip is not None:
            assert re.search(r"\b(gpu|cuda|network)\b", b.skip, re.IGNORECASE), (
                f"README.md:{b.line}: a block may opt out of this test only when it needs a GPU or the "
                f"network, and the marker must say which (got {b.skip!r})")


def test_readme_parser_sees_markers_and_languages():
    text = "x\n```python\nprint(1)\n```\n<!-- readme-test: skip (needs a GPU) -->\n\n```bash\nnvidia-smi\n```\n" \
           "```\ndiagram\n```\n"
    a, b, c = readme_blocks(text)
    assert (a.lang, a.text, a.skip) == ("python", "print(1)\n", None)
    assert (b.lang, b.skip, b.line) == ("bash", "needs a GPU", 7)
    assert not c.runnable


def test_adapt_rewrites_port_model_and_command():
    code = ".venv/bin/aurora serve --model smollm2-135m --port 8000\npython -m aurora demo\ncurl 127.0.0.1:8000/x"
    out = adapt(code, 4321, tiny=True)
    assert out == "aurora serve --model tiny-llama --port 4321\naurora demo\ncurl 127.0.0.1:4321/x"
    assert "smollm2-135m" in adapt(code, 4321, tiny=False)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_every_readme_block_runs(tmp_path):
    ran = run_readme(tmp_path, tiny=True)
    print("\n".join(ran))
    assert any(r.startswith("ran") for r in ran), ran
    assert any(r.startswith("stopped server") for r in ran), "the README no longer starts `aurora serve`?"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_every_readme_block_runs_with_the_real_model(tmp_path):
    run_readme(tmp_path, tiny=False)
