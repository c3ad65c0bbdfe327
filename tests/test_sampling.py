"""Processed distributions against hand computations (temperature -> top-k -> top-p), and
SamplingParams validation: bad values fail with ValueError before reaching the engine."""
from __future__ import annotations

import math

import pytest
import torch

from aurora.engine.sampling import draw, make_generator, processed_probs, sample
from aurora.types import MAX_TOKENS_LIMIT, SamplingParams

LOGITS = [2.0, 1.0, 0.5, 0.0, -1.0]


def _softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def _probs(params: SamplingParams, logits=LOGITS) -> list[float]:
    return processed_probs(torch.tensor([logits]), params)[0].tolist()


def test_temperature_only():
    for t in (0.5, 1.0, 2.0):
        got = _probs(SamplingParams(temperature=t))
        want = _softmax([x / t for x in LOGITS])
        assert got == pytest.approx(want, abs=1e-6)


def test_top_k_renormalises_over_k_largest():
    got = _probs(SamplingParams(temperature=0.5, top_k=2))
    e = [math.exp(2.0 / 0.5), math.exp(1.0 / 0.5)]
    assert got == pytest.approx([e[0] / sum(e), e[1] / sum(e), 0, 0, 0], abs=1e-6)
    # top_k >= vocab is off
    assert _probs(SamplingParams(top_k=5)) == pytest.approx(_softmax(LOGITS), abs=1e-6)
    assert _probs(SamplingParams(top_k=50)) == pytest.approx(_softmax(LOGITS), abs=1e-6)


def test_top_p_keeps_smallest_prefix_reaching_mass():
    p = _softmax(LOGITS)            # ~ .5630 .2071 .1256 .0762 .0280; cumulative .563 .770 .896 .972 1
    # 0.7: first two reach .770 >= .7 -> keep 2
    got = _probs(SamplingParams(top_p=0.7))
    assert got == pytest.approx([p[0] / (p[0] + p[1]), p[1] / (p[0] + p[1]), 0, 0, 0], abs=1e-6)
    # 0.9: three reach only .896 < .9 -> keep 4
    got = _probs(SamplingParams(top_p=0.9))
    s = p[0] + p[1] + p[2] + p[3]
    assert got == pytest.approx([p[0] / s, p[1] / s, p[2] / s, p[3] / s, 0], abs=1e-6)
    # 0.5: the argmax alone reaches .563 -> keep 1
    assert _probs(SamplingParams(top_p=0.5)) == pytest.approx([1, 0, 0, 0, 0], abs=0)


def test_top_p_one_is_identity_and_tiny_top_p_keeps_argmax():
    assert _probs(SamplingParams(top_p=1.0)) == pytest.approx(_softmax(LOGITS), abs=1e-7)
    got = _probs(SamplingParams(top_p=1e-6), logits=[0.1, 0.3, 0.2, 0.0, 0.25])
    assert got == pytest.approx([0, 1, 0, 0, 0], abs=0)


def test_temperature_then_top_k_then_top_p():
    """T=0.5 -> logits [4, 2, 1, 0, -2]; top-k 3 -> softmax over [4, 2, 1] = .8438 .1142 .0420;
    top-p .95 on that renormalised distribution: .8438 + .1142 = .958 >= .95 keeps two. (Applied
    to the tempered distribution before top-k, the top two hold only .941 and three would stay.)"""
    params = SamplingParams(temperature=0.5, top_k=3, top_p=0.95)
    e = [math.exp(4.0), math.exp(2.0)]
    assert _probs(params) == pytest.approx([e[0] / sum(e), e[1] / sum(e), 0, 0, 0], abs=1e-6)
    e3 = [math.exp(4.0), math.exp(2.0), math.exp(1.0)]
    got = _probs(SamplingParams(temperature=0.5, top_k=3, top_p=0.96))   # .958 < .96: keep three
    assert got == pytest.approx([v / sum(e3) for v in e3] + [0, 0], abs=1e-6)


def test_rows_are_independent_and_normalised():
    torch.manual_seed(0)
    logits = torch.randn(7, 50) * 3
    params = SamplingParams(temperature=0.8, top_k=10, top_p=0.9)
    probs = processed_probs(logits, params)
    assert probs.dtype == torch.float32 and probs.shape == (7, 50)
    assert torch.allclose(probs.sum(-1), torch.ones(7), atol=1e-5)
    for i in range(7):
        assert torch.equal(processed_probs(logits[i:i + 1], params)[0], probs[i])
        assert int((probs[i] > 0).sum()) <= 10
        assert int(probs[i].argmax()) == int(logits[i].argmax())


def test_bfloat16_logits_are_processed_in_float32():
    probs = processed_probs(torch.tensor([LOGITS], dtype=torch.bfloat16), SamplingParams())
    assert probs.dtype == torch.float32
    assert probs[0].tolist() == pytest.approx(_softmax(LOGITS), abs=1e-6)


def test_sample_and_generator_are_seeded():
    probs = torch.tensor(_softmax(LOGITS))
    a = [sample(probs, make_generator(7)) for _ in range(3)]
    g1, g2 = make_generator(123), make_generator(123)
    assert [sample(probs, g1) for _ in range(20)] == [sample(probs, g2) for _ in range(20)]
    assert len(set(a)) == 1
    g = make_generator(None)
    draws = {sample(probs, g) for _ in range(200)}
    assert draws <= set(range(5)) and len(draws) >= 3


# ----------------------------------------------------------------------------- validation

@pytest.mark.parametrize("kw", [
    {"max_tokens": 0}, {"max_tokens": -1}, {"max_tokens": MAX_TOKENS_LIMIT + 1}, {"max_tokens": 10**12},
    {"max_tokens": 2.5}, {"max_tokens": "8"}, {"max_tokens": True}, {"max_tokens": None},
    {"temperature": -0.1}, {"temperature": float("nan")}, {"temperature": float("inf")},
    {"temperature": "1"}, {"temperature": None},
    {"top_p": 0}, {"top_p": 0.0}, {"top_p": -0.5}, {"top_p": 1.0001}, {"top_p": float("nan")},
    {"top_p": "0.5"},
    {"top_k": -1}, {"top_k": 1.5}, {"top_k": True},
    {"seed": 1.5}, {"seed": "3"},
    {"stop": ""}, {"stop": ["ok", ""]}, {"stop": [3]},
])
def test_bad_sampling_params_raise_value_error(kw):
    with pytest.raises(ValueError):
        SamplingParams(**kw)


def test_greedy_means_zero_or_negligible_temperature():
    assert SamplingParams(temperature=0).greedy and SamplingParams(temperature=0.0).greedy
    assert SamplingParams(temperature=1e-9).greedy
    assert not SamplingParams(temperature=0.01).greedy and not SamplingParams(temperature=1).greedy


def test_good_sampling_params_normalise():
    sp = SamplingParams(max_tokens=MAX_TOKENS_LIMIT, temperature=0, top_p=1, top_k=0, seed=0,
                        stop="END", stop_token_ids=[5, 6])
    assert sp.greedy and sp.stop == ("END",) and sp.stop_token_ids == (5, 6)
    assert SamplingParams(stop=["a", "bc"]).stop == ("a", "bc")
    assert SamplingParams().stop == () and not SamplingParams().greedy
    assert SamplingParams(max_tokens=1, top_p=1e-9, top_k=1).max_tokens == 1


# ----------------------------------------------------------------------------- top-p without a full sort

def _sorted_top_p(logits: torch.Tensor, top_p: float, temperature: float = 1.0) -> torch.Tensor:
    """The textbook rule: sort the vocabulary, keep the smallest prefix reaching top_p."""
    probs = torch.softmax(logits.double() / temperature, -1)
    sorted_probs, order = probs.sort(-1, descending=True)
    drop = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, (sorted_probs.cumsum(-1) - sorted_probs) >= top_p)
    probs = probs.masked_fill(drop, 0.0)
    return probs / probs.sum(-1, keepdim=True)


@pytest.mark.parametrize("spread", [0.3, 3.0, 30.0])      # flat rows need the 1024 and full-vocab fallbacks
@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.99])
def test_top_p_prefilter_equals_full_sort(spread, top_p):
    g = torch.Generator().manual_seed(int(spread * 10) + int(top_p * 100))
    logits = torch.randn(7, 5000, generator=g) * spread
    logits[0] *= 0.01                                         # one nearly uniform row in every batch
    got = processed_probs(logits, SamplingParams(temperature=0.7, top_p=top_p))
    want = _sorted_top_p(logits, top_p, 0.7)
    assert ((got > 0) == (want > 0)).all()
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-4)


def test_top_p_after_top_k_uses_only_the_k_candidates():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 3000, generator=g)
    got = processed_probs(logits, SamplingParams(top_k=200, top_p=0.95))
    masked = logits.masked_fill(logits < logits.topk(200, -1).values[:, -1:], float("-inf"))
    want = _sorted_top_p(masked, 0.95)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-4)


def test_top_p_ties_at_the_cut_are_all_kept():
    got = _probs(SamplingParams(top_p=0.5), logits=[1.0, 1.0, 1.0, 1.0, -5.0])
    assert got == pytest.approx([0.25, 0.25, 0.25, 0.25, 0.0], abs=1e-6)


def test_top_p_prefilter_samples_follow_the_sorted_distribution():
    """chi-square at ALPHA=1e-3 (fixed seed): draws from the prefiltered distribution of a
    5,000-token vocabulary follow the full-sort nucleus distribution."""
    from scipy.stats import chisquare
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(1, 5000, generator=g) * 2.5
    want = _sorted_top_p(logits, 0.9, 0.7)[0]
    probs = processed_probs(logits, SamplingParams(temperature=0.7, top_p=0.9))[0]
    gen = make_generator(3)
    draws = draw(probs, gen, 20000)                          # the engine's sampler
    support = want.nonzero().squeeze(-1)
    assert 10 < support.numel() < 4000                       # a real nucleus, not the argmax alone
    counts = torch.bincount(draws, minlength=5000).double()
    assert counts[want == 0].sum() == 0
    # bin the support into ~20 equal-mass groups so expected counts stay large
    order = support[want[support].argsort(descending=True)]
    groups = (want[order].cumsum(0) * 20).floor().clamp(max=19).long()
    obs = torch.zeros(20, dtype=torch.float64).index_add_(0, groups, counts[order])
    exp = torch.zeros(20, dtype=torch.float64).index_add_(0, groups, want[order] * 20000)
    keep = exp > 0
    assert chisquare(obs[keep].numpy(), exp[keep].numpy() * obs.sum().item() / exp.sum().item()).pvalue > 1e-3


def test_draw_follows_the_distribution_and_never_draws_a_zero():
    """chi-square at ALPHA=1e-3 (fixed seed) of the inverse-CDF sampler against an unnormalised
    distribution with zeros (first, last and inside) and a tiny-mass token."""
    from scipy.stats import chisquare
    w = torch.tensor([0.0, 3.0, 0.0, 1.0, 0.5, 1e-4, 2.0, 0.0])
    draws = draw(w, make_generator(5), 40000)
    counts = torch.bincount(draws, minlength=8).double()
    assert counts[w == 0].sum() == 0 and draws.max() < 8
    keep = w > 0.1
    exp = w[keep].double() / w.sum() * 40000
    assert chisquare(counts[keep].numpy(), exp.numpy() * counts[keep].sum().item() / exp.sum().item()).pvalue > 1e-3
    assert [sample(torch.tensor([0.0, 0.0, 1.0]), make_generator(i)) for i in range(20)] == [2] * 20


@pytest.mark.parametrize("bad", [[0.5, float("nan")], [0.5, float("inf")], [0.0, 0.0], [1.0, -0.5, 1.0]])
def test_draw_rejects_an_invalid_distribution(bad):
    with pytest.raises(ValueError, match="invalid probability distribution"):
        draw(torch.tensor(bad), make_generator(0))


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.7, top_p=0.9), SamplingParams(top_k=40),
                                    SamplingParams(temperature=1.3, top_k=300, top_p=0.95)])
def test_candidate_path_equals_the_full_vocabulary_path(params):
    """Truncated rows are computed on their top candidates only; the result (values and support)
    equals the full-vocabulary computation, and rows it cannot settle exactly (a nucleus wider
    than the candidates, a tie across the cut) take the full path."""
    from aurora.engine.sampling import _full, _truncated, processed
    g = torch.Generator().manual_seed(17)
    logits = torch.randn(8, 6000, generator=g) * 4
    logits[1] *= 0.02                                              # flat: nucleus beyond 64 candidates
    logits[2, :500] = 30.0                                         # 500 tied leaders: a tie across any cut
    logits[3, 400:] = float("-inf")                                # a draft-vocabulary row (-inf outside)
    z = logits.float() / params.temperature
    ids, probs, ok = _truncated(z.clone(), params)
    assert ok[[0, 3, 4, 5, 6, 7]].all() and not ok[2]              # most rows take the candidate path
    if not params.top_k:
        assert not ok[1]
    got, support = processed(logits, params, with_support=True)
    want = _full(z.clone(), params)
    assert ((got > 0) == (want > 0)).all()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    for i in range(8):
        if ok[i]:
            assert torch.equal(support[i], want[i].nonzero().squeeze(-1))
        else:
            assert support[i] is None


def test_a_draw_over_the_support_picks_the_same_token_as_over_the_vocabulary():
    g = torch.Generator().manual_seed(3)
    probs = torch.zeros(5000)
    support = torch.randperm(5000, generator=g)[:40].sort().values
    probs[support] = torch.rand(40, generator=g)
    dense = draw(probs, make_generator(9), 500)
    sparse = draw(probs, make_generator(9), 500, support=support)
    assert torch.equal(dense, sparse) and torch.isin(sparse, support).all()
