"""Verification against its spec.

Greedy: the longest path of target-argmax children is accepted, then the target's own token.
Sampling: speculative sampling must be lossless. Over a 6-token vocabulary with known target
distributions p(. | context) and a draft q(. | context), we actually sample draft chains and
trees (i.i.d. siblings from q, plus point-mass siblings as ngram proposes), run
`verify_sampling` tens of thousands of times and chi-square-test the first emitted token and
the first two emitted tokens (joint) against the analytic target distribution. Each test
uses a fixed seed, so it is deterministic; its significance level is ALPHA = 1e-3 (a correct
verifier fails a given seed with probability 1e-3). A deliberately buggy variant (accepting
with the raw q while tokens were drawn from the tempered q) must be rejected at p < 1e-6.
"""
from __future__ import annotations

import itertools

import pytest
import torch
from scipy.stats import chisquare

from aurora.engine.tree import DraftTree
from aurora.engine.verify import verify_greedy, verify_sampling

ALPHA = 1e-3
V = 6
MAX_DEPTH = 3
TRIALS = 16_000


# ----------------------------------------------------------------------------- greedy

def _tree(nodes: list[tuple[int, int]]) -> DraftTree:
    """nodes: [(token, parent)] in topological order."""
    tree = DraftTree()
    for tok, parent in nodes:
        tree.add(tok, parent)
    return tree


def test_greedy_empty_tree_emits_target_argmax():
    assert verify_greedy(DraftTree(), [4]) == ([], 4)


def test_greedy_chain_prefix_then_bonus():
    tree = DraftTree.chain([5, 6, 7])
    # argmax after root, after node 0, after node 1, after node 2
    assert verify_greedy(tree, [5, 6, 7, 9]) == ([0, 1, 2], 9)   # all accepted + bonus
    assert verify_greedy(tree, [5, 6, 1, 9]) == ([0, 1], 1)      # reject node 2: recovered 1
    assert verify_greedy(tree, [3, 6, 7, 9]) == ([], 3)          # reject at the first node


def test_greedy_tree_follows_the_matching_branch():
    #        root
    #       /  |  \
    #     a1   b2  c3          (nodes 0, 1, 2)
    #    / \    |
    #  d4  e5   f6             (nodes 3, 4 under a1; node 5 under b2)
    #       |
    #       g7                 (node 6 under e5)
    tree = _tree([(1, -1), (2, -1), (3, -1), (4, 0), (5, 0), (6, 1), (7, 4)])
    argmax = [0] * 8
    argmax[0] = 1      # root wants a1 (node 0)
    argmax[1] = 5      # after node 0 wants e5 (node 4)
    argmax[5] = 7      # after node 4 wants g7 (node 6)
    argmax[7] = 8      # after node 6: bonus 8
    assert verify_greedy(tree, argmax) == ([0, 4, 6], 8)
    argmax[0] = 2      # now the root wants b2 (node 1), then f6 (node 5), then bonus
    argmax[2] = 6
    argmax[6] = 0
    assert verify_greedy(tree, argmax) == ([1, 5], 0)
    argmax[0] = 9      # nothing matches at the root
    assert verify_greedy(tree, argmax) == ([], 9)


def test_greedy_duplicate_siblings_take_first_and_stop_at_leaf():
    tree = _tree([(3, -1), (3, -1), (4, 1)])
    # the first sibling with token 3 is taken; it has no children, so the bonus follows it
    assert verify_greedy(tree, [3, 4, 4, 2]) == ([0], 4)


# ----------------------------------------------------------------------------- a toy language

CONTEXTS = [c for d in range(MAX_DEPTH + 1) for c in itertools.product(range(V), repeat=d)]
CTX_ID = {c: i for i, c in enumerate(CONTEXTS)}
ROOT = CTX_ID[()]
# CHILD[ctx, tok] -> id of ctx + (tok,); contexts at MAX_DEPTH map to themselves (never used).
CHILD = torch.tensor([[CTX_ID.get(c + (t,), i) for t in range(V)] for i, c in enumerate(CONTEXTS)])


def _dists(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return torch.softmax(logits / temperature, dim=-1)


def _target_logits(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(CONTEXTS), V, generator=g) * 0.8


def _good_draft(p_logits: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return p_logits + 0.3 * torch.randn(p_logits.shape, generator=g)   # q close to p


def _bad_draft(p_logits: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return -3.0 * p_logits + 0.5 * torch.randn(p_logits.shape, generator=g)   # q favours p's worst


# A tree template: node kinds in topological order, (parent template index, kind).
# kind "q": drawn from q(. | parent context); "pm": a deterministic proposal (point mass).
CHAIN3 = [(-1, "q"), (0, "q"), (1, "q")]
TREE_QQQ_PM = [(-1, "q"), (-1, "q"), (-1, "q"), (-1, "pm"),
               (0, "q"), (0, "q"), (0, "pm"), (1, "q"), (1, "q"), (2, "q"), (3, "pm"), (10, "pm")]
TREE_PM_FIRST = [(-1, "pm"), (-1, "q"), (-1, "q"), (0, "pm"), (0, "q"), (1, "q"), (1, "q"), (2, "q")]


def run_trials(template, p_probs, q_sample, q_accept, pm_token, trials, seed, verify=verify_sampling):
    """Sample `trials` draft trees from `q_sample`, verify each with `q_accept` as the
    tree's q_probs, and return (first, second) emitted tokens as [trials] tensors plus the
    mean accepted path length. When a step emits a single token, the second one is drawn
    exactly from p (what the next step does)."""
    g = torch.Generator().manual_seed(seed)
    n = len(template)
    parents = [par for par, _ in template]
    depths = []
    for par, _ in template:
        depths.append(1 if par < 0 else depths[par] + 1)
    tokens = torch.empty(trials, n, dtype=torch.long)
    ctx = torch.empty(trials, n, dtype=torch.long)
    parent_ctx = torch.empty(trials, n, dtype=torch.long)
    for j, (par, kind) in enumerate(template):                 # vectorised over trials
        pc = torch.full((trials,), ROOT) if par < 0 else ctx[:, par]
        if kind == "q":
            tok = torch.multinomial(q_sample[pc], 1, replacement=True, generator=g)[:, 0]
        else:
            tok = pm_token[pc]
        tokens[:, j], parent_ctx[:, j], ctx[:, j] = tok, pc, CHILD[pc, tok]
    target_rows = p_probs[torch.cat([torch.full((trials, 1), ROOT), ctx], dim=1)]   # [trials, 1+n, V]
    kinds = [kind for _, kind in template]
    tok_list, pc_list = tokens.tolist(), parent_ctx.tolist()
    first = torch.empty(trials, dtype=torch.long)
    second = torch.full((trials,), -1, dtype=torch.long)
    num_accepted = 0
    for i in range(trials):
        q_rows = [pc if k == "q" else -1 for pc, k in zip(pc_list[i], kinds)]
        tree = DraftTree(token_ids=tok_list[i], parents=parents, depths=depths, logprobs=[0.0] * n,
                         q_rows=q_rows, q_probs=q_accept)
        path, bonus = verify(tree, target_rows[i], g)
        emitted = [tok_list[i][node] for node in path] + [bonus]
        num_accepted += len(path)
        for a, b in itertools.pairwise(path):             # the accepted nodes form a path
            assert parents[b] == a
        assert not path or parents[path[0]] == -1
        first[i] = emitted[0]
        if len(emitted) > 1:
            second[i] = emitted[1]
    need = second < 0
    if need.any():
        rows = p_probs[CHILD[ROOT, first[need]]]
        second[need] = torch.multinomial(rows, 1, generator=g)[:, 0]
    return first, second, num_accepted / trials


def chi2_pvalue(samples: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """Pearson chi-square p-value of integer `samples` against `probs`; cells with expected
    count < min_expected are pooled into one (so the chi-square approximation holds)."""
    probs = probs.double().flatten()
    counts = torch.bincount(samples, minlength=probs.numel()).double()
    assert counts[probs == 0].sum() == 0, "a token with zero target probability was emitted"
    counts, probs = counts[probs > 0], probs[probs > 0]
    expected = probs * samples.numel()
    big = expected >= min_expected
    obs, exp = counts[big].tolist(), expected[big].tolist()
    if (~big).any():
        obs.append(float(counts[~big].sum()))
        exp.append(float(expected[~big].sum()))
    exp_sum = sum(exp)
    exp = [e * sum(obs) / exp_sum for e in exp]            # remove float drift
    return float(chisquare(obs, exp).pvalue)


def target_first_two(p_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    p0 = p_probs[ROOT]
    joint = p0[:, None] * p_probs[CHILD[ROOT]]              # [V, V]: p(a) p(b | a)
    return p0, joint


def assert_matches_target(first, second, p_probs):
    p0, joint = target_first_two(p_probs)
    p_first = chi2_pvalue(first, p0)
    p_joint = chi2_pvalue(first * V + second, joint)
    assert p_first > ALPHA, f"first-token distribution differs from the target (p={p_first:.2e})"
    assert p_joint > ALPHA, f"first-two-token distribution differs from the target (p={p_joint:.2e})"
    return p_first, p_joint


# ----------------------------------------------------------------------------- losslessness

CASES = {   # template, draft, ngram point-mass token, bounds on the mean accepted length
    "chain-good": (CHAIN3, _good_draft, "argmax", (2.0, 3.0)),
    "chain-bad": (CHAIN3, _bad_draft, "argmax", (0.2, 0.8)),
    "tree-good": (TREE_QQQ_PM, _good_draft, "argmax", (1.5, 3.0)),
    "tree-bad": (TREE_QQQ_PM, _bad_draft, "argmin", (0.4, 1.0)),
    "tree-pm-first-bad": (TREE_PM_FIRST, _bad_draft, "argmin", (0.05, 0.5)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_speculative_sampling_is_lossless(case):
    """chi-square at ALPHA=1e-3 (fixed seed): the first token and the first two tokens
    emitted by speculative sampling follow the target p, for a good (q ~ p) and a bad draft
    (q anti-correlated with p; ngram point masses on p's least likely token)."""
    template, draft, pm_kind, (lo, hi) = CASES[case]
    seed = sorted(CASES).index(case)
    p_logits = _target_logits(100 + seed)
    p = _dists(p_logits)
    q = _dists(draft(p_logits, 200 + seed))
    pm = p.argmax(-1) if pm_kind == "argmax" else p.argmin(-1)
    first, second, tau = run_trials(template, p, q, q, pm, TRIALS, seed=300 + seed)
    assert_matches_target(first, second, p)
    assert lo <= tau <= hi, f"mean accepted length {tau:.2f}: the draft was not exercised as intended"


def test_truncated_target_and_draft_outside_its_support():
    """Target processed by top-k (zeros in p) and a draft that mostly proposes tokens the
    target forbids: nothing outside the support is ever emitted, and the distribution holds
    (chi-square at ALPHA=1e-3, fixed seed)."""
    p_logits = _target_logits(7)
    kth = p_logits.topk(3, dim=-1).values[:, -1:]
    p = _dists(p_logits.masked_fill(p_logits < kth, float("-inf")))       # top-3 target
    q = _dists(-2.0 * p_logits)                                           # mass on forbidden tokens
    first, second, _ = run_trials(TREE_QQQ_PM, p, q, q, p.argmin(-1), 6_000, seed=8)
    assert (p[ROOT][first] > 0).all()
    assert_matches_target(first, second, p)


def test_chain_acceptance_rate_matches_theory():
    """For a depth-1 chain the acceptance probability is sum_x min(p(x), q(x))."""
    p_logits = _target_logits(11)
    p, q = _dists(p_logits), _dists(_bad_draft(p_logits, 12))
    g = torch.Generator().manual_seed(13)
    trials = 4000
    tokens = torch.multinomial(q[ROOT], trials, replacement=True, generator=g).tolist()
    accepted = 0
    for tok in tokens:
        tree = DraftTree()
        tree.q_probs = q
        tree.add(tok, -1, q_row=ROOT)
        path, _ = verify_sampling(tree, p[torch.tensor([ROOT, int(CHILD[ROOT, tok])])], g)
        accepted += len(path)
    want = float(torch.minimum(p[ROOT], q[ROOT]).sum())
    sd = (want * (1 - want) / trials) ** 0.5
    assert abs(accepted / trials - want) < 5 * sd


def test_raw_vs_processed_q_bug_is_detected():
    """The classic bug: draft tokens drawn from the tempered q (T=0.5, as the target p) but
    the acceptance test given the raw q (T=1). The same chi-square test that passes the
    correct pairing must reject the buggy one with p < 1e-6 (fixed seeds)."""
    temperature = 0.5
    p_logits = _target_logits(21)
    p = _dists(p_logits, temperature)
    d_logits = _good_draft(p_logits, 22)
    q_processed, q_raw = _dists(d_logits, temperature), _dists(d_logits)
    pm = p.argmax(-1)
    trials = 8_000

    first, second, _ = run_trials(CHAIN3, p, q_processed, q_processed, pm, trials, seed=23)
    assert_matches_target(first, second, p)

    first, second, _ = run_trials(CHAIN3, p, q_processed, q_raw, pm, trials, seed=23)
    p0, joint = target_first_two(p)
    p_first = chi2_pvalue(first, p0)
    p_joint = chi2_pvalue(first * V + second, joint)
    assert p_first < 1e-6 and p_joint < 1e-6, (p_first, p_joint)


def test_buggy_verifier_without_residual_is_detected():
    """A verifier that, on rejection, samples the bonus from p instead of norm(max(p - q, 0))
    over-represents the draft's favourite tokens; the test must catch it (p < 1e-6)."""
    def no_residual(tree, target_probs, generator):
        path, node = [], -1
        while True:
            p = target_probs[node + 1]
            children = tree.children(node)
            if not children:
                return path, int(torch.multinomial(p, 1, generator=generator))
            child = children[0]
            x = tree.token_ids[child]
            q = tree.q_probs[tree.q_rows[child]]
            if float(torch.rand((), generator=generator)) * float(q[x]) < float(p[x]):
                path.append(child)
                node = child
                continue
            return path, int(torch.multinomial(p, 1, generator=generator))   # BUG: should be residual

    p_logits = _target_logits(31)
    p, q = _dists(p_logits), _dists(_bad_draft(p_logits, 32))
    first, _second, _ = run_trials(CHAIN3, p, q, q, p.argmax(-1), 4000, seed=33, verify=no_residual)
    p0, _joint = target_first_two(p)
    assert chi2_pvalue(first, p0) < 1e-6


def test_verify_sampling_is_deterministic_given_generator():
    p_logits = _target_logits(41)
    p, q = _dists(p_logits), _dists(_good_draft(p_logits, 42))
    a = run_trials(TREE_QQQ_PM, p, q, q, p.argmax(-1), 300, seed=43)
    b = run_trials(TREE_QQQ_PM, p, q, q, p.argmax(-1), 300, seed=43)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_lazy_probs_compute_only_the_accepted_path_and_change_nothing():
    """The engine verifies sampled trees over LazyProbs: the same outcome as over the full
    processed tensor (same generator draws), computing only the root's and accepted nodes' rows."""
    from aurora.engine.sampling import LazyProbs, make_generator, processed_probs
    from aurora.types import SamplingParams
    params = SamplingParams(temperature=0.8, top_p=0.9)
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(9, 300, generator=g) * 3
    tree = DraftTree()
    a = tree.add(int(logits[0].argmax()), -1)                 # likely accepted
    tree.add(7, -1)
    b = tree.add(int(logits[1 + a].argmax()), a)
    tree.add(int(logits[1 + a].argmin()), a)
    c = tree.add(int(logits[1 + b].argmax()), b)
    for n in range(4):
        tree.add(n, c)
    computed = []
    for seed in range(40):
        lazy = LazyProbs(logits, params)
        want = verify_sampling(tree, processed_probs(logits, params), make_generator(seed))
        assert verify_sampling(tree, lazy, make_generator(seed)) == want
        assert lazy.num_computed == 1 + len(want[0])
        computed.append(lazy.num_computed)
    assert max(computed) >= 3 and len(tree) + 1 > max(computed)   # paths were accepted, rows were saved


def test_roots_computed_together_equal_each_row_alone():
    """The engine computes the root rows of a step's sampled sequences in one call
    (`LazyProbs.roots`); each must be the row computed alone, support included, for the
    candidate path, the full-vocabulary path (a flat row) and top-k."""
    from aurora.engine.sampling import LazyProbs
    from aurora.types import SamplingParams
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(7, 5000, generator=g) * 4
    logits[3] = torch.randn(5000, generator=g) * 0.01          # flat: the nucleus is not in the candidates
    for params in (SamplingParams(temperature=0.7, top_p=0.9), SamplingParams(temperature=1.3, top_k=20)):
        rows = [0, 3, 5]
        roots = LazyProbs.roots(logits, rows, params)
        assert (roots[1][1] is None) == (params.top_k == 0)        # top-p of the flat row: full path
        for i, root in zip(rows, roots):
            alone = LazyProbs(logits[i:], params)
            assert torch.equal(root[0], alone[0])
            assert (root[1] is None) == (alone.support(0) is None)
            if root[1] is not None:
                assert torch.equal(root[1], alone.support(0))


def test_engine_hands_each_sampled_sequence_the_root_computed_with_the_others(monkeypatch):
    """A step of several sampled sequences with the same parameters makes one `LazyProbs.roots`
    call over all their root rows, and each sequence's LazyProbs is built with its own root."""
    from aurora import Engine, EngineConfig, SamplingParams
    from aurora.engine import engine as engine_mod
    from aurora.engine.sampling import LazyProbs
    calls, given = [], []
    real_roots = LazyProbs.roots

    def roots(logits, rows, params):
        out = real_roots(logits, rows, params)
        calls.append((list(rows), out))
        return out

    class Spy(LazyProbs):
        def __init__(self, logits, params, root=None):
            given.append(root)
            super().__init__(logits, params, root)
    monkeypatch.setattr(LazyProbs, "roots", staticmethod(roots))
    monkeypatch.setattr(engine_mod, "LazyProbs", Spy)
    params = SamplingParams(max_tokens=6, temperature=0.8, top_p=0.9, seed=3, ignore_eos=True)
    with Engine(EngineConfig(model="tiny-llama", draft="ngram", online=False, dtype="float32")) as eng:
        outs = eng.generate_batch(["ab ab ab ab", "hello hello", "def f(x):"], params)
    assert all(len(o.token_ids) == 6 for o in outs)
    assert any(len(rows) == 3 for rows, _ in calls)                # all three roots in one call
    handed = [id(r[0]) for _, out in calls for r in out]
    assert sum(r is not None and id(r[0]) in handed for r in given) >= 3
