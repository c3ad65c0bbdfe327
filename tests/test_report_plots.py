"""Plots people understand: draft swaps found and marked, at most four systems per panel,
final speedups as bars, and a new directory per run so runs never overwrite each other."""
import json
from pathlib import Path

import pytest

from aurora.bench import report

ROOT = Path(__file__).resolve().parents[1]


def test_swap_indices():
    assert report.swap_indices([0, 1, 2, 3, 4, 5], [0, 0, 1, 1, 3, 2]) == [2, 4, 5]     # a rollback is a swap too
    assert report.swap_indices([0, 1, 2], [None, None, None]) == []
    assert report.swap_indices([3, 7, 9], [None, 1, 1]) == []                           # first known version
    assert report.swap_indices([0, 1, 2], [1, None, 2]) == [2]


@pytest.mark.parametrize("n", range(14))
def test_panel_groups_at_most_four_balanced(n):
    names = [f"s{i}" for i in range(n)]
    groups = report.panel_groups(names)
    assert [x for g in groups for x in g] == names
    assert all(1 <= len(g) <= report.MAX_PER_PANEL for g in groups)
    assert len(groups) == -(-n // report.MAX_PER_PANEL)
    if groups:
        assert max(map(len, groups)) - min(map(len, groups)) <= 1 or len(groups[-1]) < len(groups[0])


def _series(n_systems=9, n_requests=12):
    out = {}
    for k in range(n_systems):
        tau = [1.0] * n_requests if k < 2 else [1.0 + 0.1 * k + 0.02 * i for i in range(n_requests)]
        out[f"sys{k}"] = {"label": f"sys{k}", "index": list(range(n_requests)), "tau": tau,
                          "tokens_per_s": [10.0 + k] * n_requests, "speedup": 1.0 + 0.05 * k,
                          "draft_version": [i // 4 for i in range(n_requests)]}
    return out


def test_layout_bars_plus_small_tau_panels(tmp_path):
    series = _series()
    bars, tau_groups, tps_groups = report.plot_layout(series)
    assert bars == list(series)                                  # every system in the bar chart
    assert [n for g in tau_groups for n in g] == [f"sys{k}" for k in range(2, 9)]    # tau 1 throughout: no line
    assert all(len(g) <= 4 for g in tau_groups) and tps_groups == []
    path = report.plot_tau(series, [4, 8], tmp_path / "tau.png", title="t", window=3,
                           phases=[(0, 4, "code"), (4, 8, "finance"), (8, 12, "chat")])
    assert path.stat().st_size > 10_000


def test_layout_without_speedups_splits_tokens_per_s():
    series = _series(6)
    for s in series.values():
        s.pop("speedup")
    bars, _, tps_groups = report.plot_layout(series)
    assert bars == [] and [len(g) for g in tps_groups] == [3, 3]


def test_committed_results_plot_has_readable_panels():
    results = json.loads((ROOT / "docs/results/bench.json").read_text())
    bars, tau_groups, _ = report.plot_layout(report.plot_series(results))
    assert len(bars) == len(results["systems"]) and all(len(g) <= 4 for g in tau_groups)


def test_run_dirs_never_collide(tmp_path):
    a = report.run_dir(tmp_path)
    b = report.run_dir(tmp_path)
    c = report.run_dir(tmp_path, "quick")
    assert len({a, b, c}) == 3 and all(p.is_dir() and p.parent == tmp_path for p in (a, b, c))
    assert c.name.split("-", 2)[2].startswith("quick")
    latest = tmp_path / "latest"
    assert latest.is_symlink() and latest.resolve() == c.resolve()


def test_output_dir_default_is_new_and_explicit_never_overwrites(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = report.output_dir(None, "bench_out", ("results.json",))
    b = report.output_dir(None, "bench_out", ("results.json",), "named")
    assert a != b and a.parent == b.parent == Path("bench_out") and b.name.endswith("named")
    mine = report.output_dir(str(tmp_path / "mine"), "bench_out", ("results.json",))
    assert mine.is_dir()
    (mine / "notes.txt").write_text("unrelated files are fine")
    assert report.output_dir(str(mine), "bench_out", ("results.json",)) == mine
    (mine / "results.json").write_text("{}")
    with pytest.raises(ValueError, match="earlier run"):
        report.output_dir(str(mine), "bench_out", ("results.json",))
