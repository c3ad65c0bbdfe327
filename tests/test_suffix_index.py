"""Property tests of the suffix index against a brute-force model of the same traffic: matches
(deepest context length, occurrence positions), continuation counts, tree invariants, eviction
in insertion order, the byte bound, growth, persistence, and in-flight visibility through the
proposer. Seeded random traffic over a small vocabulary (many repeats, interleaved requests)."""
from __future__ import annotations

import math
import random

import pytest

from aurora import EngineConfig, SamplingParams, SpecConfig
from aurora.drafts.base import ProposeContext
from aurora.drafts.ngram import NgramProposer
from aurora.drafts.suffix import SuffixProposer, find_suffix
from aurora.drafts.suffix_index import LEVELS, SuffixIndex
from aurora.engine.sampling import make_generator
from aurora.engine.sequence import Sequence

MIB = 1 << 20


class Traffic:
    """Requests written interleaved into an index and into a plain list (the reference)."""

    def __init__(self, index: SuffixIndex):
        self.index = index
        self.cursors, self.tokens = {}, {}
        self.owner: list[tuple[int, int]] = []        # absolute position -> (request, offset)

    def write(self, rid: int, token: int) -> None:
        if rid not in self.cursors:
            self.cursors[rid], self.tokens[rid] = self.index.open(), []
        self.index.append(self.cursors[rid], token)
        self.owner.append((rid, len(self.tokens[rid])))
        self.tokens[rid].append(token)

    def brute_match(self, rid: int, lo: int = 0) -> tuple[int, list[int]]:
        """Deepest level whose context (last n tokens of `rid`) ended earlier at a live position
        that has a (live) continuation; those positions newest first."""
        ctx = self.tokens[rid]
        for n in reversed(LEVELS):
            if len(ctx) < n:
                continue
            want = ctx[-n:]
            found = []
            for p in range(len(self.owner) - 1, lo - 1, -1):
                r, off = self.owner[p]
                toks = self.tokens[r]
                if off + 1 < len(toks) and off + 1 >= n and toks[off + 1 - n:off + 1] == want:
                    found.append(p)
            if found:
                return n, found
        return 0, []

    def next_token(self, p: int) -> int:
        r, off = self.owner[p]
        return self.tokens[r][off + 1]


def random_traffic(index: SuffixIndex, num_tokens: int, vocab: int, seed: int, num_requests: int = 6) -> Traffic:
    rng = random.Random(seed)
    traffic = Traffic(index)
    motifs = [[rng.randrange(vocab) for _ in range(rng.randint(3, 10))] for _ in range(4)]
    for _ in range(num_tokens // 4):
        rid = rng.randrange(num_requests)
        chunk = rng.choice(motifs) if rng.random() < 0.5 else [rng.randrange(vocab) for _ in range(4)]
        for t in chunk[:rng.randint(1, len(chunk))]:
            traffic.write(rid, t)
    return traffic


@pytest.mark.parametrize("seed", range(4))
def test_match_equals_brute_force(seed):
    index = SuffixIndex(MIB, max_occurrences=10_000, max_walk=100_000)
    traffic = random_traffic(index, 1500, vocab=5 + seed, seed=seed)
    for rid, cur in traffic.cursors.items():
        n, positions = traffic.brute_match(rid)
        m = index.match(cur)
        assert (m.length, m.positions) == (n, positions), rid


@pytest.mark.parametrize("seed", range(3))
def test_children_are_ranked_continuation_counts(seed):
    index = SuffixIndex(MIB, max_occurrences=10_000, max_walk=100_000)
    traffic = random_traffic(index, 1200, vocab=4, seed=seed)
    for rid, cur in traffic.cursors.items():
        _, positions = traffic.brute_match(rid)
        counts: dict[int, int] = {}
        for p in positions:
            counts[traffic.next_token(p)] = counts.get(traffic.next_token(p), 0) + 1
        tokens, parents, probs, _, supports = index.speculate(cur, max_nodes=64, max_depth=1, min_prob=0.0,
                                                              spec_factor=100)
        assert parents == [-1] * len(tokens)
        assert supports == [counts[t] for t in tokens]                  # occurrences behind each node
        assert dict(zip(tokens, probs)) == pytest.approx({t: c / len(positions) for t, c in counts.items()})
        assert [counts[t] for t in tokens] == sorted(counts.values(), reverse=True)


@pytest.mark.parametrize("seed", range(3))
def test_tree_invariants(seed):
    index = SuffixIndex(MIB)
    traffic = random_traffic(index, 3000, vocab=6, seed=seed)
    for rid, cur in traffic.cursors.items():
        for max_nodes, min_prob, factor in [(16, 0.1, 1.0), (8, 0.3, 2.0), (32, 0.0, 0.5)]:
            tokens, parents, probs, length, supports = index.speculate(cur, max_nodes, 16, min_prob, factor)
            assert all(supports[i] <= supports[par] for i, par in enumerate(parents) if par >= 0)
            assert len(tokens) <= min(max_nodes, math.ceil(factor * length))     # short match, few nodes
            depth = []
            for i, par in enumerate(parents):
                assert par < i                                       # parents precede children
                depth.append(1 if par < 0 else depth[par] + 1)
                assert probs[i] >= min_prob and (par < 0 or probs[i] <= probs[par] + 1e-12)
            assert max(depth, default=0) <= max(1, math.ceil(factor * length))
            siblings = {}
            for i, par in enumerate(parents):                       # siblings are distinct tokens
                assert tokens[i] not in siblings.setdefault(par, set())
                siblings[par].add(tokens[i])
            if tokens:                                               # every path followed the context
                ctx = traffic.tokens[rid][-length:]
                for i in range(len(tokens)):
                    path, node = [], i
                    while node >= 0:
                        path.append(tokens[node])
                        node = parents[node]
                    want = ctx + path[::-1]
                    assert any(want == toks[j:j + len(want)] for toks in traffic.tokens.values()
                               for j in range(len(toks) - len(want) + 1)), (rid, want)


def test_byte_bound_and_eviction_of_oldest_requests():
    index = SuffixIndex(MIB)
    cap = index.capacity
    rng = random.Random(0)
    cursors, firsts = [], []
    for r in range(3 * cap // 100):
        cur = index.open()
        firsts.append(index.hi)
        index.extend(cur, [1000 + r] + [rng.randrange(50) for _ in range(99)])   # a unique first token
        cursors.append(cur)
        assert index.nbytes <= index.max_bytes
        assert index.num_tokens <= cap
    assert index.num_tokens == cap and index.lo == index.hi - cap         # FIFO over insertion order
    probe = index.open()
    for r in (0, len(cursors) // 3, len(cursors) - 1):                        # old requests forgotten, new kept
        index.extend(probe, [1000 + r])
        live = firsts[r] >= index.lo
        assert bool(index.match(probe).positions) == live, r
    assert index.nbytes <= index.max_bytes


def test_growth_rehash_keeps_every_match():
    index = SuffixIndex(8 * MIB, max_occurrences=10_000, max_walk=100_000)
    traffic = random_traffic(index, 20_000, vocab=30, seed=7, num_requests=20)   # grows 4096 -> 32768 slots
    assert len(index.tok) > 4096 and index.mask + 1 > 1024
    for rid, cur in list(traffic.cursors.items())[:8]:
        m = index.match(cur)
        n, positions = traffic.brute_match(rid)
        assert (m.length, m.positions) == (n, positions)


def test_budget_too_small_is_a_clear_error():
    with pytest.raises(ValueError, match="too small"):
        SuffixIndex(64 << 10)
    with pytest.raises(ValueError, match="suffix_bytes"):
        SpecConfig(suffix_bytes=1000)
    with pytest.raises(ValueError, match="suffix_min_prob"):
        SpecConfig(suffix_min_prob=2.0)


def test_save_load_roundtrip(tmp_path):
    index = SuffixIndex(2 * MIB)
    traffic = random_traffic(index, 6000, vocab=8, seed=3)
    index.save(tmp_path)
    loaded = SuffixIndex.load(tmp_path)
    assert (loaded.lo, loaded.hi, loaded.nbytes) == (index.lo, index.hi, index.nbytes)
    for cur in traffic.cursors.values():
        assert loaded.speculate(cur, 16, 16) == index.speculate(cur, 16, 16)
    with pytest.raises(ValueError, match="no suffix index"):
        SuffixIndex.load(tmp_path / "missing")


# ---------------------------------------------------------------- the proposer

def seq(rid: str, ids: list[int]) -> Sequence:
    return Sequence(rid, list(ids), SamplingParams(temperature=0.0), make_generator(0))


def ctx(spec: SpecConfig) -> ProposeContext:
    return ProposeContext(spec, 1000)


def test_in_flight_tokens_visible_to_every_request_at_the_next_step():
    spec = SpecConfig(suffix_bytes=2 * MIB)
    prop = SuffixProposer(spec)
    a, b = seq("a", [5, 6, 7, 8]), seq("b", [1, 2, 3])
    assert [len(t) for t in prop.propose([a, b], ctx(spec))] == [0, 0]
    a.token_ids += [1, 2, 3, 40, 41, 42]              # a commits tokens this step (after on_step)
    trees = prop.propose([b, a], ctx(spec))           # next step: b is drafted before a, still sees them
    assert trees[0].token_ids[:3] == [40, 41, 42]
    prop.release(a)                                   # finished: still remembered
    c = seq("c", [9, 1, 2, 3])
    assert prop.propose([c], ctx(spec))[0].token_ids[:3] == [40, 41, 42]
    assert prop.stats()["in_flight"] == 2 and prop.stats()["tokens"] == 4 + 6 + 3 + 4


def test_prompts_indexed_on_step_before_decoding():
    spec = SpecConfig(suffix_bytes=2 * MIB, suffix_spec_factor=1.0)
    prop = SuffixProposer(spec)
    prefill = seq("p", [11, 12, 13, 14, 15, 16, 17])
    prop.on_step([prefill], None, None, None)         # prefilling: never proposed for, still indexed
    other = seq("o", [11, 12, 13])
    assert prop.propose([other], ctx(spec))[0].token_ids == [14, 15, 16]    # depth <= match length 3


def test_proposals_name_their_evidence_for_the_policy():
    """Suffix nodes carry (match length, occurrences behind the path, minor branch); prompt
    lookup's carry its match length (DraftTree.sources, read by the adaptive policy)."""
    spec = SpecConfig(suffix_bytes=2 * MIB, suffix_min_prob=0.0)
    prop = SuffixProposer(spec)
    for rid, ids in (("a", [1, 2, 3, 4, 5]), ("b", [1, 2, 3, 4, 5]), ("c", [1, 2, 3, 4, 5]), ("d", [1, 2, 3, 9])):
        prop.on_step([seq(rid, ids)], None, None, None)
    tree = prop.propose([seq("e", [7, 1, 2, 3])], ctx(spec))[0]     # "1 2 3": 3 tokens matched, seen 4 times
    assert tree.token_ids[:3] == [4, 9, 5]
    assert tree.sources[:3] == ["sfx:m3:s2", "sfx:m3:s1:minor", "sfx:m3:s2"]   # 3 of 4, 1 of 4, then 3 of 3
    assert NgramProposer().propose([seq("f", [1, 2, 3, 1, 2])], ctx(spec))[0].sources == ["ng:m2"] * 3


def test_proposer_persistence_and_switch(tmp_path):
    spec = SpecConfig(suffix_bytes=2 * MIB)
    prop = SuffixProposer(spec)
    prop.propose([seq("a", [1, 2, 3, 4, 5, 6])], ctx(spec))
    assert prop.save(tmp_path) == str(tmp_path)
    restored = SuffixProposer(spec, path=str(tmp_path))
    assert restored.propose([seq("b", [1, 2, 3])], ctx(spec))[0].token_ids == [4, 5, 6]
    off = SpecConfig(suffix_bytes=2 * MIB, suffix_persist=False)
    assert SuffixProposer(off).save(tmp_path / "x") is None and not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="suffix_persist"):
        EngineConfig(model="tiny-llama", draft=f"suffix:{tmp_path}", spec=off)
    with pytest.raises(ValueError, match="persistence is off"):
        SuffixProposer(off).load(tmp_path)
    assert find_suffix(prop) is prop


def test_unknown_draft_lists_suffix():
    with pytest.raises(ValueError, match="suffix"):
        EngineConfig(model="tiny-llama", draft="sufix")
