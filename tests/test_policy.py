"""Adaptive speculation: the online cost model recovers step costs, the policy keeps nodes
that pay and drops those that do not (switching speculation off), pruned trees stay valid
trees, and speculative greedy output with the adaptive policy still equals plain greedy."""
from __future__ import annotations

import pytest

from aurora import SamplingParams, SpecConfig
from aurora.engine.costs import StepCostModel
from aurora.engine.policy import AdaptivePolicy, SpeculationPolicy, build_policy, subtree
from aurora.engine.sequence import Sequence
from aurora.engine.tree import DraftTree


def test_cost_model_recovers_linear_step_cost():
    m = StepCostModel()
    for i in range(200):
        tokens = 8 + (i * 7) % 40
        m.observe(tokens, 0.050 + 0.002 * tokens)
    a, b = m.coefficients()
    assert a == pytest.approx(0.050, rel=0.05) and b == pytest.approx(0.002, rel=0.05)


def test_cost_model_without_variation_falls_back_to_the_prior_slope():
    m = StepCostModel()
    for _ in range(50):
        m.observe(4, 0.1)
    a, b = m.coefficients()
    assert 0 < b < 0.01 and a + 4 * b == pytest.approx(0.1, rel=1e-6)


def _seq(rid="r"):
    seq = Sequence(rid, [1, 2, 3], SamplingParams(temperature=0), None)
    seq.num_cached = 2
    return seq


def _train(policy, accept_depths: int, steps: int = 60, tokens=(1, 6), step_s=(0.05, 0.06)):
    """Feed chains of depth 5 of which the first `accept_depths` nodes are accepted."""
    seq = _seq()
    for i in range(steps):
        tree = DraftTree.chain([7, 8, 9, 10, 11])
        policy.observe([seq], [tree], [(list(range(accept_depths)), 0)])
        t = tokens[i % 2]
        policy.observe_step(t, step_s[0] + (step_s[1] - step_s[0]) * (t - tokens[0]) / (tokens[1] - tokens[0]),
                            1, 0.002)
    return seq


def _flat_then_rising(rows: int) -> float:
    """A CPU-like step: 20 ms up to 8 rows, then 1.5 ms per row."""
    return 0.020 + 0.0015 * max(0, rows - 8)


def test_cost_curve_follows_a_flat_then_rising_step():
    m = StepCostModel()
    for i in range(400):
        rows = [1, 5, 9, 17, 33][i % 5]
        m.observe(rows, _flat_then_rising(rows))
    curve = m.curve(1, 40)
    assert curve == sorted(curve)                                          # non-decreasing
    assert curve[4] == pytest.approx(0.020, rel=0.05)                      # 5 rows cost one
    assert curve[32] == pytest.approx(_flat_then_rising(33), rel=0.05)
    _, b = m.coefficients()
    assert curve[4] - curve[0] < 0.3 * (4 * b)                             # the line charges 4 rows 4 b
    assert 1 not in StepCostModel().table_ms()


def test_monotone_fit_pools_violators_instead_of_lifting_everything_after_them():
    from aurora.engine.costs import monotone_fit
    cells = [(1, 20.0, 1.0), (2, 30.0, 1.0), (3, 21.0, 1.0), (4, 22.0, 1.0), (5, 40.0, 1.0)]
    fit = [y for _, y in monotone_fit(cells)]
    assert fit == sorted(fit) and fit[0] == 20.0 and fit[-1] == 40.0
    assert fit[1] == fit[2] == fit[3] == pytest.approx(73.0 / 3)           # 30, 21, 22 pooled, not 30 30 30
    assert monotone_fit([(1, 1.0, 1.0), (2, 2.0, 1.0)]) == [(1, 1.0), (2, 2.0)]


def test_cost_curve_falls_back_to_the_line_where_unmeasured_or_stale():
    m = StepCostModel()
    m.observe(16, 1.0)                                                    # one slow 16-row step, long ago
    for i in range(2000):
        rows = 1 + i % 2
        m.observe(rows, 0.01 * rows)
    line = m.step_time(16)
    assert m.curve(16, 16)[0] == pytest.approx(line, rel=0.01)


@pytest.mark.parametrize("costs, kept", [("measured", 6), ("linear", 0)])
def test_nearly_free_first_nodes_are_verified_under_the_measured_curve(costs, kept):
    """Six sibling nodes, each accepted ~2.4 % of the time, on a step that costs about the same
    for 1..8 rows: the measured curve verifies them all (7 rows cost about one), a line through
    the same timings charges each ~5 % of a step and verifies none."""
    policy = AdaptivePolicy(SpecConfig(depth=6, adaptive=True, policy_costs=costs))
    for i in range(300):
        rows = [1, 3, 7, 12, 17][i % 5]
        policy.observe_step(rows, _flat_then_rising(rows), 1, 0.0005)
    seq = _seq()
    tree = DraftTree()
    for k in range(6):
        tree.add(7 + k, -1, -1.9)                       # six siblings, q rows none: 'scored'
    for k in range(210):                                # one of the six accepted in 1 step of 7
        policy.observe([_seq("o")], [tree], [([0] if k % 7 == 0 else [], 0)])
    policy.release(_seq("o"))
    assert policy.alpha("scored", 1) == pytest.approx(1 / 42, abs=0.01)
    assert len(policy.prune([seq], [tree])[0]) == kept


def test_step_costs_are_kept_per_batch_size():
    """One sequence verifying up to 8 nodes steps along a flat curve; eight plain sequences fill
    the same row buckets at twice the time and pay 3 ms per extra row. Keyed by rows alone the
    two would average; each batch's own curve prices its nodes."""
    policy = AdaptivePolicy(SpecConfig(depth=8, adaptive=True))
    for i in range(300):
        rows = [1, 5, 9][i % 3]
        policy.observe_step(rows, 0.020, 1, 0.0005, num_seqs=1)            # batch 1: flat 20 ms
        rows = [8, 9, 12][i % 3]
        policy.observe_step(rows, 0.040 + 0.003 * (rows - 8), 8, 0.004, num_seqs=8)
    assert policy.step_costs(1).curve(1, 9)[-1] == pytest.approx(0.020, rel=0.02)
    assert policy.step_costs(8).curve(9, 12)[-1] - policy.step_costs(8).curve(9, 9)[0] == pytest.approx(0.009, rel=0.1)
    assert policy.step_costs(32) is policy.costs                          # no steps of that size yet
    tree = DraftTree()
    for k in range(8):
        tree.add(7 + k, -1, -1.9)                       # eight siblings, 'scored'
    for k in range(200):                                # one of the eight accepted in 1 step of 5
        policy.observe([_seq("o")], [tree], [([0] if k % 5 == 0 else [], 0)])
    policy.release(_seq("o"))
    assert len(policy.prune([_seq()], [tree])[0]) == 8                  # nearly free at batch 1
    batch = [_seq(f"b{i}") for i in range(8)]
    assert sum(len(t) for t in policy.prune(batch, [tree] + [DraftTree()] * 7)) == 0   # 3 ms each at 8
    assert set(policy.state()["cost_ms_by_batch"]) == {"1", "8-15"}


def test_policy_keeps_nodes_that_pay_and_drops_those_that_do_not():
    spec = SpecConfig(depth=5, adaptive=True)
    good = AdaptivePolicy(spec)
    seq = _train(good, accept_depths=5)
    assert good.choose([seq]) == spec
    tree = DraftTree.chain([7, 8, 9, 10, 11])
    assert len(good.prune([seq], [tree])[0]) == 5
    bad = AdaptivePolicy(spec)
    seq = _train(bad, accept_depths=0, tokens=(1, 6), step_s=(0.05, 0.10))   # nodes cost 10 ms each
    kept = bad.prune([seq], [DraftTree.chain([7, 8, 9, 10, 11])])[0]
    assert len(kept) == 0
    decisions = [bad.choose([seq]) for _ in range(16)]
    assert decisions.count(None) >= 12 and decisions.count(spec) >= 1    # off, but probing


def test_policy_per_sequence_history_overrides_the_global_estimate():
    policy = AdaptivePolicy(SpecConfig(adaptive=True))
    _train(policy, accept_depths=0)
    lucky = _seq("lucky")
    for _ in range(30):
        policy.observe([lucky], [DraftTree.chain([1, 2, 3])], [([0, 1, 2], 0)])
    assert policy.alpha("lookup", 1, "lucky") > 0.8 > 0.2 > policy.alpha("lookup", 1, "r")


def test_sampled_acceptance_is_kept_apart_from_greedy_acceptance():
    """Under sampling a lookup node is accepted w.p. min(1, p/q), not on an argmax match: a
    stream of rejected sampled proposals must not switch greedy speculation off (and back)."""
    policy = AdaptivePolicy(SpecConfig(depth=3, adaptive=True))
    _train(policy, accept_depths=5)                                       # greedy: everything accepted
    for i in range(60):
        hot = Sequence(f"s{i}", [1, 2, 3], SamplingParams(temperature=0.7, top_p=0.9), None)
        policy.observe([hot], [DraftTree.chain([1, 2, 3])], [([], 0)])   # sampled: nothing accepted
    assert policy.alpha("lookup", 1) > 0.9 and policy.alpha("lookup:sampled", 1) < 0.1
    greedy_seq, sampled_seq = _seq("g"), Sequence("t", [1, 2, 3], SamplingParams(temperature=0.7), None)
    assert policy.realised(greedy_seq)[0] > 2.5 > 0.5 > policy.realised(sampled_seq)[0]
    assert set(policy.state()["accepted_per_proposal"]) == {"greedy", "sampled"}


def test_acceptance_is_kept_per_source_so_weak_matches_are_pruned_and_strong_ones_kept():
    """Pooled, short one-occurrence suffix matches (always rejected here) and long repeated
    matches (always accepted) average to one alpha; per source the policy cuts the former and
    verifies the latter whole. The coarse estimate (what a source-less node uses) stays pooled."""
    weak, strong = "sfx:m2:s1", "sfx:m12:s4"

    def trained(**spec):
        policy = AdaptivePolicy(SpecConfig(depth=5, max_nodes=16, adaptive=True, **spec))
        _train(policy, accept_depths=2, step_s=(0.05, 0.06))             # step costs for the cost model
        for i in range(80):
            seq = _seq(f"w{i}")
            for source, accepted in ((weak, []), (strong, [0, 1, 2, 3, 4])):
                policy.observe([seq], [DraftTree.chain([7, 8, 9, 10, 11], source)], [(accepted, 0)])
            policy.release(seq)
        return policy

    pooled = trained(policy_sources=False)                               # the A/B switch: kinds only
    tree = DraftTree.chain([7, 8, 9], weak)
    assert pooled.node_probs(tree)[0] == pytest.approx(pooled.alpha("lookup", 1))
    assert not pooled.state()["alpha_by_source"]
    policy = trained()
    assert policy.node_probs(tree)[0] < 0.1 and policy.alpha("lookup", 1, fine=f"lookup/{weak}") < 0.1
    assert policy.alpha("lookup", 3, fine=f"lookup/{strong}") > 0.9
    assert 0.3 < policy.alpha("lookup", 1) < 0.7
    fresh = _seq("new")
    kept = policy.prune([fresh, fresh], [DraftTree.chain([7, 8, 9], weak), DraftTree.chain([7, 8, 9, 10, 11], strong)])
    assert len(kept[0]) == 0 and len(kept[1]) == 5
    assert kept[1].sources == [strong] * 5                               # pruning keeps the sources
    state = policy.state()
    assert f"lookup/{weak}@1" in state["alpha_by_source"] and "lookup@1" in state["alpha"]


def test_a_sequence_shifts_its_whole_draft_family_within_a_step_or_two():
    """Everyone: suffix chains right about half the time at every depth. A request that repeats
    earlier text (two steps, all five accepted) lifts every depth and match length of its suffix
    nodes at once; one of new text (two steps, nothing accepted) lowers them; prompt lookup, a
    different family, keeps the global estimate."""
    policy = AdaptivePolicy(SpecConfig(adaptive=True))
    for i in range(60):
        seq = _seq(f"e{i}")
        policy.observe([seq], [DraftTree.chain([7, 8, 9, 10, 11], "sfx:m8:s1")], [(list(range(i % 6)), 0)])
        policy.release(seq)
    glob = policy.alpha("lookup", 4, None, "lookup/sfx:m12:s1")
    repeat, new_text = _seq("repeat"), _seq("new")
    for _ in range(2):
        policy.observe([repeat], [DraftTree.chain([7, 8, 9, 10, 11], "sfx:m8:s1")], [([0, 1, 2, 3, 4], 0)])
        policy.observe([new_text], [DraftTree.chain([7, 8, 9, 10, 11], "sfx:m8:s1")], [([], 0)])
    assert policy.alpha("lookup", 4, "repeat", "lookup/sfx:m12:s1") > 0.9 > 0.8 > glob
    assert policy.alpha("lookup", 4, "new", "lookup/sfx:m12:s1") < 0.6 * glob
    assert policy.alpha("lookup", 1, "new", "lookup/ng:m3") == policy.alpha("lookup", 1, None, "lookup/ng:m3")
    assert policy.alpha("scored", 2, "repeat", "scored/sfx:m4:s4:minor") > \
        policy.alpha("scored", 2, None, "scored/sfx:m4:s4:minor")          # one family across kinds
    policy.release(repeat)
    assert policy.alpha("lookup", 4, "repeat", "lookup/sfx:m12:s1") == policy.alpha("lookup", 4, None,
                                                                                    "lookup/sfx:m12:s1")


def test_a_long_accepted_run_keeps_its_own_statistics():
    """After a step that accepted >= RUN_LONG tokens the next step's nodes read the ':run'
    estimates (here: always right), the others the plain source's (here: never past depth 8)."""
    from aurora.engine.policy import RUN_LONG
    policy = AdaptivePolicy(SpecConfig(adaptive=True))
    chain = list(range(10, 10 + RUN_LONG + 2))
    for i in range(40):
        seq = _seq(f"c{i}")
        policy.observe([seq], [DraftTree.chain(chain, "sfx:m16:s1")], [([], 0)])          # a miss: no run
        policy.observe([seq], [DraftTree.chain(chain, "sfx:m16:s1")], [([0], 0)])         # no run before it
        policy.observe([seq], [DraftTree.chain(chain, "sfx:m16:s1")], [(list(range(RUN_LONG)), 0)])
        policy.observe([seq], [DraftTree.chain(chain, "sfx:m16:s1")], [(list(range(len(chain))), 0)])  # run
        policy.release(seq)
    copying, fresh = _seq("copying"), _seq("fresh")
    policy.observe([copying], [DraftTree.chain(chain, "sfx:m16:s1")], [(list(range(RUN_LONG)), 0)])
    policy.observe([fresh], [DraftTree()], [([], 0)])
    tree = DraftTree.chain(chain, "sfx:m16:s1")
    run, no_run = policy.node_probs(tree, "copying")[-1], policy.node_probs(tree, "fresh")[-1]
    assert run > 0.5 > 0.3 > no_run
    short = _seq("short")                                  # 4 accepted, the whole (pruned) chain: a run too
    policy.observe([short], [DraftTree.chain([1, 2, 3, 4], "sfx:m16:s1")], [([0, 1, 2, 3], 0)])
    assert policy.node_probs(tree, "short")[-1] > 0.5
    policy.observe([short], [DraftTree.chain([1, 2, 3, 4, 5], "sfx:m16:s1")], [([0, 1, 2, 3], 0)])
    assert policy.node_probs(tree, "short")[-1] < 0.3     # stopped short of the leaf: not a run
    assert any(k.endswith(":run@3") for k in policy.state()["alpha_by_source"])


def test_merged_trees_keep_sources_and_mark_agreement():
    a = DraftTree.chain([5, 6, 7], "sfx:m8:s1")
    a.merge(DraftTree.chain([5, 6, 9], "ng:m2"), dedupe=True, max_nodes=16)
    assert a.token_ids == [5, 6, 7, 9] and a.sources == ["agree", "agree", "sfx:m8:s1", "ng:m2"]


def test_subtree_keeps_ancestors_order_and_q_rows():
    tree = DraftTree()
    a = tree.add(5, -1, -0.1, 0)
    b = tree.add(6, -1, -0.2, 1)
    c = tree.add(7, a, -0.3, 2)
    tree.add(8, b, -0.4, 3)
    sub = subtree(tree, {a, b, c})
    assert sub.token_ids == [5, 6, 7] and sub.parents == [-1, -1, 0] and sub.q_rows == [0, 1, 2]
    assert sub.find_child(0, 7) == 2 and sub.children(-1) == [0, 1] and sub.depths == [1, 1, 2]


def test_adaptive_policy_is_the_serving_default():
    """The dataclass default (tests' conftest makes `SpecConfig()` the fixed tree, see there)."""
    import dataclasses
    assert next(f for f in dataclasses.fields(SpecConfig) if f.name == "adaptive").default is True
    assert type(build_policy(SpecConfig(adaptive=True))) is AdaptivePolicy
    assert type(build_policy(SpecConfig(adaptive=False))) is SpeculationPolicy


@pytest.mark.parametrize("draft", ["ngram", "eagle+ngram"])
def test_adaptive_speculative_greedy_equals_plain(engines, draft):
    prompts = [[(i * 31 + k) % 50 + 3 for i in range(40)] for k in range(3)]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    plain = engines.get("tiny-llama", "none").generate_batch(prompts, params)
    eng = engines.get("tiny-llama", draft, SpecConfig(depth=4, adaptive=True))
    spec = eng.generate_batch(prompts, params)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    assert eng.stats()["policy_adaptive"]


def test_measured_step_rates_switch_speculation_off_where_it_loses_end_to_end():
    """The forward-only cost model says speculation pays (every node accepted), but whole
    steps with speculation emit fewer tokens per second than steps without it (costs outside
    the forward): the policy samples steps without speculation, then keeps it off (probing),
    in that batch-size bucket only."""
    spec = SpecConfig(depth=5, adaptive=True)
    policy = AdaptivePolicy(spec)
    seq = _train(policy, accept_depths=5)
    assert policy.choose([seq]) == spec                   # no evidence of plain steps yet
    choices = [policy.choose([seq]) for _ in range(200)]
    for c in choices:                                     # spec steps: 3 tokens in 0.2 s; plain: 1 in 0.02 s
        policy.observe_wall([seq], c is not None, 3 if c is not None else 1, 0.2 if c is not None else 0.02)
    assert any(c is None for c in choices[:40])           # sampled steps without speculation
    later = [policy.choose([seq]) for _ in range(64)]
    assert sum(c is None for c in later) >= 56 and any(c is not None for c in later)   # off, probing
    assert policy.state()["steps_off_measured"] > 0
    batch = [_seq(f"r{i}") for i in range(4)]             # another bucket has no such evidence
    assert policy.choose(batch) == spec


def test_measured_step_rates_keep_speculation_where_it_wins():
    spec = SpecConfig(depth=5, adaptive=True)
    policy = AdaptivePolicy(spec)
    seq = _train(policy, accept_depths=5)
    for i in range(100):
        c = policy.choose([seq])
        policy.observe_wall([seq], c is not None, 4 if c is not None else 1, 0.06 if c is not None else 0.05)
    assert sum(policy.choose([seq]) is None for _ in range(64)) <= 1


def test_measured_step_rates_forget_both_kinds_at_the_same_pace():
    """Rates of a kind not seen for a while go stale together with the bucket's clock: spec steps
    measured long ago (a slower machine) stop being compared with recent plain steps."""
    policy = AdaptivePolicy(SpecConfig(depth=5, adaptive=True))
    seq = _seq("r0")
    for _ in range(20):
        policy.observe_wall([seq], True, 2, 0.2)           # 10 tok/s, early
    assert policy.measured_rates([seq]) == (pytest.approx(10.0), None)
    for _ in range(300):
        policy.observe_wall([seq], False, 1, 0.02)         # 50 tok/s, recent
    on, off = policy.measured_rates([seq])
    assert on is None and off == pytest.approx(50.0)       # no recent evidence with speculation: no verdict
    policy.observe_wall([_seq(f"b{i}") for i in range(4)], True, 8, 0.1)     # other buckets keep their own clock
    assert policy.measured_rates([seq])[1] == pytest.approx(50.0)


@pytest.mark.parametrize("adaptive", [False, True])
def test_engine_times_whole_steps_only_for_a_policy_that_reads_them(fresh_engine, adaptive):
    """The fixed tree never reads end-to-end step rates, so the engine's hot path skips timing
    them for it; the adaptive policy gets one observation per decode step."""
    eng = fresh_engine("tiny-llama", "ngram", SpecConfig(depth=3, adaptive=adaptive))
    seen = []
    eng.policy.observe_wall = lambda seqs, speculated, tokens, seconds: seen.append(tokens)
    eng.generate_batch([[5, 6, 7, 5, 6, 7, 5, 6]], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert eng.policy.reads_step_rates is adaptive
    assert (len(seen) > 0) is adaptive and sum(seen) <= 8
