"""Prompt lookup copies the continuation of the latest earlier match of the longest suffix:
`SpecConfig.ngram_depth` tokens of it (`depth` when 0), never more than `max_nodes`."""
from __future__ import annotations

import pytest

from aurora import SpecConfig
from aurora.drafts.base import ProposeContext
from aurora.drafts.ngram import NgramProposer, lookup


class _Seq:
    def __init__(self, ids):
        self.token_ids = ids


TEXT = list(range(40)) + [7, 8, 9]          # "7 8 9" occurred before, followed by 10, 11, ...


def _proposed(**spec):
    return NgramProposer().propose([_Seq(TEXT)], ProposeContext(SpecConfig(**spec), vocab_size=100))[0].token_ids


def test_lookup_copies_after_the_latest_longest_match():
    assert lookup([1, 2, 3, 9, 1, 2, 4, 9, 1, 2], depth=3, n_max=3, n_min=1) == [4, 9, 1]
    assert lookup([5, 6, 7], depth=3, n_max=3, n_min=1) == []


def _scan(tokens, depth, n_max, n_min):
    """The reference: a plain scan, newest start first."""
    size = len(tokens)
    for n in range(min(n_max, size - 1), n_min - 1, -1):
        for start in range(size - n - 1, -1, -1):
            if tokens[start:start + n] == tokens[size - n:]:
                return tokens[start + n:start + n + depth], n
    return [], 0


@pytest.mark.parametrize("seed", range(4))
def test_byte_search_equals_the_plain_scan(seed):
    """Ids whose bytes recur inside other ids (256 = 00 01 00 00, 65536 = 00 00 01 00, ...) make
    byte matches that straddle two ids: those must be skipped, never proposed."""
    import random
    from aurora.drafts.ngram import lookup_match
    rng = random.Random(seed)
    alphabet = [0, 1, 256, 65536, 16777216, 257, 49151]
    for _ in range(300):
        tokens = [rng.choice(alphabet) for _ in range(rng.randrange(0, 40))]
        n_max = rng.randrange(1, 5)
        assert lookup_match(tokens, 5, n_max, 1) == _scan(tokens, 5, n_max, 1)
    assert lookup_match([1, 256, 0, 7, 0, 1], 2, 1, 1) == ([256, 0], 1)     # not the 01 00 00 00 inside 256, 0


@pytest.mark.parametrize("spec,want", [({}, 5), ({"ngram_depth": 10}, 10), ({"ngram_depth": 12, "max_nodes": 8}, 8),
                                       ({"depth": 3}, 3)])
def test_ngram_depth_sets_how_far_lookup_copies(spec, want):
    assert _proposed(**spec) == list(range(10, 10 + want))


def test_bad_ngram_depth_is_a_clear_error():
    with pytest.raises(ValueError, match="ngram_depth"):
        SpecConfig(ngram_depth=-1)
