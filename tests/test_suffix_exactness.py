"""The suffix draft and its compositions (tree union, one verification pass) keep the target's
output: fp32 speculative greedy equals plain greedy alone, batched, in mixed batches with
requests joining mid-flight, and after the index has memorised the traffic (deep trees get
accepted); speculative sampling follows the target distribution (chi-square: point-mass q, and
the frequency q of `suffix_q="frequency"`, whose nodes are draws from their q rows)."""
from __future__ import annotations

import pytest
from test_exactness import (  # noqa: E402 -- the shared references and helpers
    PROMPTS,
    SAMPLING_MODEL,
    assert_mixed_batch_exact,
    greedy,
    self_repeating_prompt,
)
from test_exactness import (
    test_spec_sampling_matches_target_distribution as _chi_square,
)

from aurora import SpecConfig

TINY_MODELS = ["tiny-llama", "tiny-qwen3", "tiny-gemma2"]
SUFFIX_DRAFTS = ["suffix", "suffix+ngram", "eagle+suffix", "eagle+suffix+ngram"]
SMALL = {"suffix_bytes": 4 << 20}


def engine(engines, model, draft, shape="chain", **options):
    return engines.get(model, draft, SpecConfig(shape=shape, **SMALL), **options)


@pytest.mark.parametrize("draft", SUFFIX_DRAFTS)
@pytest.mark.parametrize("model", TINY_MODELS)
def test_suffix_greedy_equals_plain(engines, model, draft):
    plain = engines.get(model)
    spec = engine(engines, model, draft)
    prompts = PROMPTS + [self_repeating_prompt(plain)]
    want = [o.token_ids for o in plain.generate_batch(prompts, greedy())]
    for _ in range(2):                              # the second pass drafts from the memorised first
        assert [o.token_ids for o in spec.generate_batch(prompts, greedy())] == want
    for prompt, ids in zip(prompts, want):          # batch 1
        assert spec.generate_batch([prompt], greedy())[0].token_ids == ids
    assert spec.stats()["accepted_length"] > 1.5, "the memory was hardly ever accepted"


@pytest.mark.parametrize("shape", ["static", "dynamic"])
def test_suffix_composed_with_eagle_trees_greedy_equals_plain(engines, shape):
    plain = engines.get("tiny-llama")
    spec = engine(engines, "tiny-llama", "eagle+suffix+ngram", shape)
    prompts = PROMPTS + [self_repeating_prompt(plain)]
    want = [o.token_ids for o in plain.generate_batch(prompts, greedy())]
    for _ in range(2):
        assert [o.token_ids for o in spec.generate_batch(prompts, greedy())] == want


@pytest.mark.parametrize("draft", SUFFIX_DRAFTS)
@pytest.mark.parametrize("model", TINY_MODELS)
def test_suffix_mixed_batch_joining_mid_flight(engines, staggered, model, draft):
    """Greedy and seeded sampled requests share batches, half join while the others run (their
    tokens enter the shared index as they are committed); greedy outputs equal plain greedy."""
    plain = engines.get(model)
    assert_mixed_batch_exact(plain, engine(engines, model, draft), staggered,
                             [self_repeating_prompt(plain)] + PROMPTS + PROMPTS[:3], lambda i: 40 - 2 * i)


@pytest.mark.parametrize("draft", ["suffix", "suffix+ngram", "eagle+suffix+ngram"])
def test_suffix_sampling_matches_target_distribution(engines, spec_engine, draft):
    """The shared chi-square test (ALPHA 1e-3, 1500 seeded requests, temperature 3, top-k 3) with
    the suffix draft: point-mass proposals from every earlier request's sampled tokens."""
    _chi_square(engines, spec_engine, draft, "chain")
    tau = spec_engine(SAMPLING_MODEL, draft, max_batch=64).stats()["accepted_length"]
    assert tau > 1.2, f"the suffix draft was hardly ever accepted (tau {tau:.2f}): the test proves little"


@pytest.fixture(scope="module")
def spec_engine(engines):
    def get(model, draft, shape="chain", **options):
        return engine(engines, model, draft, shape, **options)
    return get


def _frequency_engine(engines):
    def get(model, draft, shape="chain", **options):
        return engines.get(model, draft, SpecConfig(shape=shape, suffix_q="frequency", **SMALL), **options)
    return get


@pytest.mark.parametrize("draft", ["suffix", "suffix+ngram"])
def test_suffix_frequency_q_sampling_matches_target_distribution(engines, draft):
    """suffix_q="frequency": children drawn from the continuation frequencies, q = those. The
    shared chi-square test, and the count of accepted q-drawn nodes proving the path ran."""
    from test_paths import AcceptCounter
    get = _frequency_engine(engines)
    eng = get(SAMPLING_MODEL, draft, max_batch=64)
    counter = AcceptCounter()
    eng.step_hooks.append(counter)
    try:
        _chi_square(engines, get, draft, "chain")
    finally:
        eng.step_hooks.remove(counter)
    assert counter.accepted_q >= 300, f"only {counter.accepted_q} q-drawn suffix nodes accepted"


def test_suffix_frequency_nodes_are_draws_from_their_q(engines):
    from test_exactness import (
        test_sampled_draft_nodes_are_draws_from_their_q as _draws_from_q,
    )
    _draws_from_q(_frequency_engine(engines), "suffix", "chain")
