"""The long-stream benchmark (tiny preset smoke run) and the cost-aware composed draft gate."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from aurora.bench import stream
from aurora.config import SpecConfig
from aurora.drafts import ProposeContext
from aurora.drafts.base import Proposer
from aurora.drafts.compose import EXPLORE_EVERY, EXPLORE_MAX, ComposedProposer
from aurora.engine.tree import DraftTree


def test_stream_bench_smoke(tmp_path):
    rc = stream.main(["--model", "tiny-llama", "--per-domain", "2", "--domains", "code,chat", "--max-tokens", "8",
                      "--utilization", "1", "--window", "2", "--dtype", "float32", "--max-prompt-chars", "80",
                      "--systems", "ngram,online,eagle-online,eagle-static", "--out", str(tmp_path)])
    assert rc == 0
    res = json.loads((tmp_path / "stream.json").read_text())
    assert res["shift_at"] == [2]
    assert set(res["rows"]) == {"ngram", "online", "eagle-online", "eagle-static"}
    assert all(len(rows) == 4 for rows in res["rows"].values())
    assert len(res["summary"]["domains"]) == 2 and "online_over_ngram_tok_s" in res["summary"]["domains"][0]
    assert (tmp_path / "stream.png").stat().st_size > 0
    static = res["rows"]["eagle-static"]
    assert static[-1]["steps"] == static[2]["steps"] or static[-1]["steps"] - static[2]["steps"] <= 1


def test_interleaved_stream_trains_only_the_serving_system(monkeypatch):
    """Request by request, every system in turn; while one serves (and idles after), the other
    systems' trainers are paused, and eagle-static's stays paused after the first domain."""
    import argparse
    from aurora.workloads.corpora import Prompt
    seen = []

    def fake_serve(eng, i, prompt, args):
        seen.append((i, {n: e.flywheel.paused for n, e in engines.items() if e.flywheel is not None}, eng))
        return {"i": i, "tau": 1.0, "steps": 0, "swaps": 0}

    engines = {}
    real_engine = stream._engine

    def make(name, args):
        engines[name] = real_engine(name, args)
        return engines[name]
    monkeypatch.setattr(stream, "_serve_one", fake_serve)
    monkeypatch.setattr(stream, "_engine", make)
    args = argparse.Namespace(model="tiny-llama", checkpoint=None, dtype="float32", seed=0, window=10)
    prompts = [Prompt("a b", "code", "t"), Prompt("c d", "chat", "t"), Prompt("e f", "chat", "t")]
    runs = stream.serve_interleaved(["ngram", "online", "eagle-static"], prompts, args, [1], progress=None)
    assert [r["i"] for r in runs["online"]] == [0, 1, 2] and len(seen) == 9
    for k, (i, paused, eng) in enumerate(seen):
        serving = next(n for n, e in engines.items() if e is eng)
        assert serving == ["ngram", "online", "eagle-static"][k % 3]
        want = {"online": serving != "online",
                "eagle-static": serving != "eagle-static" or i >= 1}
        assert paused == want, (i, serving, paused)


def test_ratio_interval_is_paired_over_requests():
    """Requests differ 10x in speed but the system is 1.2x ngram on every one: the paired interval
    is [1.2, 1.2] (resampling each system's requests independently would make it wide)."""
    base = [{"tokens": 48, "seconds": 1.0 + 9.0 * (i % 2)} for i in range(30)]
    fast = [{"tokens": 48, "seconds": r["seconds"] / 1.2} for r in base]
    lo, hi = stream.ratio_interval(fast, base, range(10, 30))
    assert lo == pytest.approx(1.2) and hi == pytest.approx(1.2)
    noisy = [{"tokens": 48, "seconds": r["seconds"] / (1.2 if i % 3 else 0.9)} for i, r in enumerate(base)]
    lo, hi = stream.ratio_interval(noisy, base, range(30))
    point = sum(r["tokens"] for r in noisy) / sum(r["seconds"] for r in noisy) / (
        sum(r["tokens"] for r in base) / sum(r["seconds"] for r in base))
    assert lo < point < hi and hi - lo > 0.05


def test_summary_reports_an_interval_and_a_line_per_ratio():
    rows = {name: [{"i": i, "domain": "code" if i < 6 else "chat", "tokens": 8, "seconds": 1.0 / speed,
                    "tau": 1.5, "steps": i, "swaps": 0} for i in range(12)]
            for name, speed in (("ngram", 1.0), ("online-ckpt", 1.1))}
    summary = stream.summarize(rows, [6], 12, 3)
    code = summary["domains"][0]
    assert code["online-ckpt_over_ngram_tok_s"] == pytest.approx(1.1)
    assert code["online-ckpt_over_ngram_tok_s_ci95"] == pytest.approx([1.1, 1.1])
    assert summary["requests_until_online_ckpt_beats_ngram_tok_s"] == 3
    lines = stream.ratio_lines(summary)
    assert len(lines) == 2 and lines[0].startswith("code, last third: online-ckpt / ngram 1.100x (95 % interval 1.100-1.100)")


def test_stream_rejects_bad_arguments():
    assert stream.main(["--utilization", "0"]) == 2
    assert stream.main(["--systems", "nope", "--per-domain", "1"]) == 2
    assert stream.main(["--systems", "ngram,online-ckpt", "--per-domain", "1"]) == 2    # needs --checkpoint


def test_stream_online_from_a_checkpoint(tmp_path):
    """online-ckpt starts eagle+ngram from a saved draft (e.g. the corpus day-0 one) and learns on."""
    from aurora import Engine, EngineConfig
    from aurora.flywheel.checkpoint import save_head
    eng = Engine(EngineConfig(model="tiny-llama", draft="eagle", online=False, dtype="float32"))
    save_head(eng.proposer.head, tmp_path / "day0")
    eng.close()
    rc = stream.main(["--model", "tiny-llama", "--per-domain", "2", "--domains", "code,chat", "--max-tokens", "8",
                      "--utilization", "1", "--window", "2", "--dtype", "float32", "--max-prompt-chars", "80",
                      "--systems", "ngram,online-ckpt,eagle-online-ckpt,online-ckpt-suffix",
                      "--checkpoint", str(tmp_path / "day0"), "--sequential", "--out", str(tmp_path / "out")])
    assert rc == 0
    res = json.loads((tmp_path / "out" / "stream.json").read_text())
    for name in ("online-ckpt", "eagle-online-ckpt", "online-ckpt-suffix"):
        rows = res["rows"][name]
        assert len(rows) == 4 and all(r["ttft_s"] is not None and r["ttft_s"] > 0 for r in rows)
    summary = res["summary"]
    assert "online-ckpt_over_ngram_tok_s" in summary["domains"][0]
    assert "online-ckpt-suffix_over_ngram_tok_s" in summary["domains"][0]
    assert "requests_until_online_ckpt_beats_ngram_tok_s" in summary
    assert "requests_until_eagle_ckpt_beats_ngram_tau" in summary
    assert summary["domains"][0]["eagle-online-ckpt"]["tau_start"] is not None


class _Clock:
    t = 0.0

    def __call__(self):
        return self.t


CLOCK = _Clock()
STEP_S, DRAFT_S = 0.05, 0.001          # target step; learned draft per depth (c = 0.02 per depth)


class _Fixed(Proposer):
    def __init__(self, tokens, learnable):
        self.tokens, self.learnable, self.calls, self.depths = tokens, learnable, 0, []

    def propose(self, seqs, ctx):
        self.calls += 1
        self.depths.append(ctx.spec.depth if self.learnable else None)
        if self.learnable:
            CLOCK.t += DRAFT_S * ctx.spec.depth
        return [DraftTree.chain(self.tokens[:ctx.spec.depth]) for _ in seqs]


def _composed(learned, ngram):
    comp = ComposedProposer([learned, ngram])
    comp.clock = CLOCK
    return comp


class _Seq:
    class params:
        greedy = True


CTX = ProposeContext(SpecConfig(depth=4), vocab_size=100)


def _run(comp, accepted_depths: int, steps: int):
    for _ in range(steps):
        tree = comp.propose([_Seq()], CTX)[0]
        CLOCK.t += STEP_S
        comp.on_step(None, None, None, None)
        path = sorted(tree.learned)[:accepted_depths]                # the learned chain's first nodes
        comp.observe([tree], [(path, 0)])


def test_gate_closes_when_gain_is_below_cost():
    learned, ngram = _Fixed([7, 8, 9, 10], True), _Fixed([1], False)
    comp = _composed(learned, ngram)
    _run(comp, accepted_depths=0, steps=20 * EXPLORE_EVERY)       # the optimistic prior decays
    before = learned.calls
    _run(comp, accepted_depths=0, steps=20 * EXPLORE_EVERY)
    assert not comp.gate_open
    assert learned.calls - before <= 20                             # exploration only, shallow
    assert max(learned.depths[before:]) <= 2
    stats = comp.source_stats()
    assert stats["learned_gain"] < stats["learned_cost"] or stats["learned_gain"] < 0.05


def test_closed_gate_probes_less_often_until_the_draft_changes():
    """While the gate stays closed on one draft version, the probe interval doubles up to
    EXPLORE_MAX; a swap (new version) is probed at once and resets the interval."""
    learned, ngram = _Fixed([7, 8, 9, 10], True), _Fixed([1], False)
    comp = _composed(learned, ngram)
    _run(comp, accepted_depths=0, steps=20 * EXPLORE_EVERY)
    assert not comp.gate_open
    before = learned.calls
    _run(comp, accepted_depths=0, steps=16 * EXPLORE_MAX)
    assert comp.explore_every == EXPLORE_MAX
    assert learned.calls - before <= 16 + 4                        # ~one probe per EXPLORE_MAX steps
    learned.version = 1                                             # the trainer swapped in new weights
    before = learned.calls
    _run(comp, accepted_depths=0, steps=1)
    assert learned.calls - before == 1 and comp.source_stats()["explore_every"] == 2 * EXPLORE_EVERY
    _run(comp, accepted_depths=0, steps=EXPLORE_EVERY)
    assert learned.calls - before == 2                              # the next probe EXPLORE_EVERY later


def test_gate_opens_and_deepens_when_learned_tokens_pay():
    learned, ngram = _Fixed([7, 8, 9, 10], True), _Fixed([1], False)
    comp = _composed(learned, ngram)
    _run(comp, accepted_depths=3, steps=30 * EXPLORE_EVERY)
    assert comp.gate_open and max(learned.depths[-EXPLORE_EVERY:]) >= 3
    assert comp.gain > comp.cost


def test_gate_trims_depth_to_what_pays():
    learned, ngram = _Fixed([7, 8, 9, 10], True), _Fixed([1], False)
    comp = _composed(learned, ngram)
    _run(comp, accepted_depths=1, steps=60 * EXPLORE_EVERY)
    regular = learned.depths[-4 * EXPLORE_EVERY:]
    assert comp.gate_open and min(regular) == 1                   # depth 1 pays, deeper does not


def test_gate_node_cost_is_the_step_time_fit_shared_with_the_policy():
    """The gate prices a node at b / a of t = a + b * nodes, fitted by engine/costs.py."""
    class _Varying(_Fixed):                                               # chains of 1..5 nodes
        def propose(self, seqs, ctx):
            self.calls += 1
            return [DraftTree.chain([20 + j for j in range(1 + self.calls % 5)]) for _ in seqs]

    comp = _composed(_Fixed([7, 8, 9, 10], True), _Varying([], False))
    assert comp.source_stats()["node_cost"] == pytest.approx(0.03)           # the prior, unmeasured
    seen = set()
    for _ in range(80):
        comp.propose([_Seq()], CTX)
        seen.add(comp._num_nodes)
        CLOCK.t += 0.05 + 0.005 * comp._num_nodes                          # 10% of a step per node
        comp.on_step(None, None, None, None)
    assert len(seen) >= 4
    assert comp.source_stats()["node_cost"] == pytest.approx(0.1, rel=0.1)


def test_demo_reports_speedup_over_ngram_and_why(tmp_path, capsys):
    from aurora.bench.demo import main
    rc = main(["--model", "tiny-llama", "--requests", "3", "--max-tokens", "8", "--baseline", "2",
               "--domains", "code,chat", "--out", str(tmp_path)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "speedup over the n-gram draft alone" in text and "τ first third" in text
    data = json.loads((tmp_path / "demo.json").read_text())
    assert data["speedup_over_ngram"] is not None and data["baseline_ngram_tokens_per_s"]
    if not (data["speedup"] > 1.0 and data["speedup_over_ngram"] >= 1.0):
        assert "learning has not paid yet" in text


def test_demo_verdict_lines():
    from aurora.bench.demo import verdict
    assert verdict(1.2, 1.05, 1.5, 1.9, {"steps": 500}, None) is None
    assert verdict(1.2, 1.05, 1.5, 1.9, {"steps": 500}, None, saved=True) is None
    assert "what pays here is the saved draft" in verdict(1.2, 1.05, 1.5, 1.9, {"steps": 0}, None, saved=True)
    assert verdict(1.2, 1.05, 1.5, 1.9, {"steps": 0}, None) is None          # from scratch: nothing saved paid
    assert "the saved draft did not pay" in verdict(1.17, 0.93, 2.0, 1.5, {"steps": 0}, None, saved=True)
    assert "only 3 optimizer steps" in verdict(0.8, 0.9, 1.5, 1.9, {"steps": 3}, None)
    assert "did not rise" in verdict(0.8, 0.9, 1.9, 1.5, {"steps": 500}, None)
    line = verdict(0.9, 0.95, 1.5, 1.9, {"steps": 500}, {"learned_gain": 0.1, "learned_cost": 0.3})
    assert "gate mostly closed" in line
    paying = {"learned_gain": 0.36, "learned_cost": 0.10}
    assert "take their CPU share from serving" in verdict(1.2, 0.87, 1.9, 1.7, {"steps": 13}, paying)
    assert "take their CPU share" not in verdict(1.2, 0.87, 1.9, 1.7, {"steps": 13}, paying, load=0.6)


def test_gate_is_kept_per_coverage_group():
    """The learned branch pays only where the training-free draft has no proposal: its gate
    closes on steps with a lookup match (it is then run only to probe) and stays open on the
    others."""
    from aurora.drafts.compose import UNCOVERED
    COVERED = 1                                                   # a 1-token match (chain([1]) has no match_len)

    class _Alternating(_Fixed):                                   # a match on every other step
        def propose(self, seqs, ctx):
            self.calls += 1
            return [DraftTree.chain([1] if self.calls % 2 else []) for _ in seqs]

    learned, ngram = _Fixed([7, 8, 9, 10], True), _Alternating([], False)
    comp = _composed(learned, ngram)
    ran = {COVERED: 0, UNCOVERED: 0}
    for step in range(80 * EXPLORE_EVERY):
        if step == 40 * EXPLORE_EVERY:                            # the optimistic prior has decayed
            ran = {COVERED: 0, UNCOVERED: 0}
        tree = comp.propose([_Seq()], CTX)[0]
        group = COVERED if ngram.calls % 2 else UNCOVERED
        ran[group] += comp._ran_learned
        CLOCK.t += STEP_S
        comp.on_step(None, None, None, None)
        path = sorted(tree.learned)[:2] if group == UNCOVERED else []   # pays only where uncovered
        comp.observe([tree], [(path, 0)])
    by = comp.source_stats()["by_coverage"]
    assert by["none"]["gate_open"] and not by["match1"]["gate_open"]
    assert ran[UNCOVERED] == 20 * EXPLORE_EVERY and ran[COVERED] < 4 * EXPLORE_EVERY
    assert by["none"]["share"] == pytest.approx(by["match1"]["share"], abs=0.05)


def test_learned_marks_survive_pruning_and_merge_respects_depth():
    """The adaptive policy's pruning re-indexes a tree; the learned-only marks must follow
    the nodes (else the gate would credit the learned branch nothing on pruned steps)."""
    from aurora.engine.policy import subtree
    tree = DraftTree.chain([1, 2])
    tree.merge(DraftTree.chain([5, 6, 7]), dedupe=True, max_nodes=16, max_depth=2)
    assert tree.token_ids == [1, 2, 5, 6]                           # depth 3 (token 7) left out
    tree.learned, tree.coverage = {2, 3}, 1
    pruned = subtree(tree, {0, 2, 3})
    assert pruned.token_ids == [1, 5, 6] and pruned.learned == {1, 2} and pruned.coverage == 1


def test_coverage_groups_follow_the_lookup_match_length():
    """ngram and the suffix draft record how much context they matched; a composed tree keeps
    the longest, and the gate's group is that length capped at 3 (0: no proposal)."""
    from aurora.drafts.compose import coverage_group
    from aurora.drafts.ngram import NgramProposer
    from aurora.engine.tree import DraftTree as Tree
    seq = SimpleNamespace(token_ids=[5, 6, 7, 8, 1, 5, 6, 7])      # "5 6 7" seen before: a 3-token match
    tree = NgramProposer().propose([seq], CTX)[0]
    assert tree.token_ids == [8, 1, 5, 6] and tree.match_len == 3 and coverage_group(tree) == 3
    seq.token_ids = [5, 6, 9, 2, 6]                                 # only "6" recurs
    tree = NgramProposer().propose([seq], CTX)[0]
    assert tree.match_len == 1 and coverage_group(tree) == 1
    assert coverage_group(Tree()) == 0
    base = Tree.chain([1])
    base.match_len = 1
    other = Tree.chain([1, 2])
    other.match_len = 5
    base.merge(other, dedupe=True, max_nodes=16)
    assert base.match_len == 5 and coverage_group(base) == 3


def test_suffix_draft_records_its_match_length():
    from aurora.drafts.suffix import SuffixProposer
    prop = SuffixProposer(SpecConfig())
    done = SimpleNamespace(request_id="a", token_ids=[1, 2, 3, 4, 5, 6], num_prompt_tokens=2, params=_Seq.params)
    prop.propose([done], CTX)
    prop.release(done)
    live = SimpleNamespace(request_id="b", token_ids=[9, 2, 3, 4], num_prompt_tokens=1, params=_Seq.params)
    tree = prop.propose([live], CTX)[0]
    assert tree.token_ids[:2] == [5, 6] and tree.match_len == 3
