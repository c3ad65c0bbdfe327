"""Prefix cache: the allocator's owner counts and LRU of evictable blocks, chain-key matching
(a block matches only when everything before it matches too), eviction and block accounting
under a random workload, and, on a real engine in fp32, greedy output identical with the
cache on and off while later turns of a conversation skip the prefill they share."""
from __future__ import annotations

import random

import pytest
import torch

from aurora import Engine, EngineConfig, SamplingParams
from aurora.config import TrainerConfig
from aurora.engine.kv_cache import BlockAllocator, KVCache, OutOfBlocks
from aurora.engine.sampling import make_generator
from aurora.engine.scheduler import Scheduler
from aurora.engine.sequence import Sequence

BS = 4


def _sched(num_blocks=16, max_batch=8) -> Scheduler:
    cache = KVCache(1, num_blocks, BS, 1, 2, torch.float32, torch.device("cpu"))
    return Scheduler(cache, max_batch=max_batch, prefix_cache=True)


def _seq(rid: str, tokens: list[int]) -> Sequence:
    return Sequence(rid, list(tokens), SamplingParams(max_tokens=100, temperature=0), make_generator(0))


def _step(sched: Scheduler, seqs, new_token: int = 7) -> None:
    """Pretend a step ran as the engine commits it: uncached tokens cached, one token appended."""
    for s in seqs:
        s.num_cached = len(s.token_ids)
        s.token_ids.append(new_token)
        sched.trim(s)
        sched.commit(s)


def test_allocator_counts_owners_and_keeps_retained_blocks_evictable():
    alloc = BlockAllocator(4)
    kept, evicted = {0, 1}, []
    alloc.retain, alloc.on_evict = kept.__contains__, evicted.append
    a = alloc.allocate(2)
    assert sorted(a) == [0, 1]
    alloc.share(0)                                  # a second owner
    alloc.free([0])
    assert alloc.owners(0) == 1 and alloc.num_free == 2
    alloc.free(a)                                   # last owners gone: retained blocks stay evictable
    assert alloc.num_free == 4 and alloc.num_evictable == 2
    alloc.share(1)                                  # taken back from the LRU
    assert alloc.owners(1) == 1 and alloc.num_evictable == 1
    got = alloc.allocate(3)                         # two free, then evicts block 0
    assert evicted == [0] and 0 in got and 1 not in got
    with pytest.raises(OutOfBlocks):
        alloc.allocate(1)
    with pytest.raises(ValueError):
        alloc.free([1, 1])                          # second free of a one-owner block
    with pytest.raises(ValueError):
        BlockAllocator(2).share(0)                  # a free block cannot be shared


def test_a_blocked_head_is_not_rematched_until_blocks_or_prefixes_change():
    sched = _sched(num_blocks=4)
    a = _seq("a", list(range(10, 22)))             # 12 tokens: 3 of the 4 blocks
    sched.add(a)
    sched.schedule(tree_budget=0)
    _step(sched, [a])                              # blocks registered; a now needs a 4th
    b = _seq("b", list(range(10, 22)) + [50, 51, 52])   # shares a's 3 blocks, needs a 4th
    sched.add(b)
    sched.schedule(tree_budget=0)
    assert sched.waiting[0] is b and not b.block_ids    # blocked: only 0 free after a's 4th block
    matched, match = [], sched.prefix.match
    sched.prefix.match = lambda seq: matched.append(seq) or match(seq)
    for _ in range(3):                             # nothing changed: the head is not matched again
        assert sched.schedule(tree_budget=0) == [a] and sched.waiting[0] is b
    assert matched == []
    sched.finish(a)                                # blocks come back (a's prefix stays cached)
    sched.schedule(tree_budget=0)
    assert matched == [b] and sched.running == [b] and b.num_prefix_cached == 12


def test_a_later_request_shares_the_full_blocks_of_its_prefix():
    sched = _sched()
    a = _seq("a", list(range(10, 21)))             # 11 tokens: 2 full blocks + 3
    sched.add(a)
    sched.schedule(tree_budget=0)
    _step(sched, [a])                              # prompt cached; blocks 0-1 registered
    assert sched.prefix.stats()["prefix_cached_blocks"] == 2
    b = _seq("b", list(range(10, 21)) + [99, 98])  # same 11 tokens, then more
    sched.add(b)
    sched.schedule(tree_budget=0)
    assert b.num_cached == b.num_prefix_cached == 8 and b.block_ids[:2] == a.block_ids[:2]
    assert b.block_ids[2] != a.block_ids[2]        # a partial block is never shared
    for blk in a.block_ids[:2]:
        assert sched.cache.allocator.owners(blk) == 2
    c = _seq("c", list(range(10, 18)))             # exactly 2 blocks: the last token is recomputed
    sched.add(c)
    sched.schedule(tree_budget=0)
    assert c.num_cached == 4 and c.num_uncached == 4
    for s in (a, b, c):
        sched.finish(s)
    assert sched.cache.allocator.num_free == 16


def test_a_block_matches_only_after_the_same_prefix():
    sched = _sched()
    a = _seq("a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    sched.add(a)
    sched.schedule(tree_budget=0)
    _step(sched, [a])
    sched.finish(a)
    b = _seq("b", [0, 2, 3, 4, 5, 6, 7, 8, 9])     # block 1 identical, block 0 not
    sched.add(b)
    sched.schedule(tree_budget=0)
    assert b.num_cached == 0 and sched.prefix.num_hit_tokens == 0


def test_preempted_request_reuses_its_own_prefix():
    sched = _sched(num_blocks=16)
    a = _seq("a", list(range(30, 43)))             # 13 tokens
    sched.add(a)
    sched.schedule(tree_budget=0)
    _step(sched, [a])
    sched.preempt(a)
    assert a.num_cached == 0 and a.block_ids == []
    sched.schedule(tree_budget=0)
    assert a.num_cached == 12 and a.num_uncached == 2   # 3 full blocks back; two tokens to run


def test_random_workload_keeps_accounting_and_never_shares_a_block_being_written():
    """Shared and registered blocks only ever hold positions below every owner's num_cached;
    owner counts match the sequences holding a block; every block comes back."""
    rng = random.Random(0)
    sched = _sched(num_blocks=24, max_batch=4)
    alloc = sched.cache.allocator
    stems = [[rng.randrange(50) for _ in range(rng.randrange(3, 14))] for _ in range(4)]
    live, n = [], 0
    for _ in range(300):
        if len(live) < 6 and rng.random() < 0.4:
            s = _seq(f"r{n}", rng.choice(stems) + [rng.randrange(50) for _ in range(rng.randrange(1, 6))])
            n += 1
            sched.add(s)
            live.append(s)
        running = sched.schedule(tree_budget=rng.randrange(0, 6))
        holders: dict[int, list] = {}
        for s in list(sched.running) + list(sched.waiting):
            for i, blk in enumerate(s.block_ids):
                holders.setdefault(blk, []).append((s, i))
        for blk, who in holders.items():
            assert alloc.owners(blk) == len(who)
            if len(who) > 1 or blk in sched.prefix._key_of:
                for s, i in who:                   # nobody writes below num_cached
                    assert (i + 1) * BS <= s.num_cached, "a shared block is still being written"
        assert len(holders) + alloc.num_free == alloc.num_blocks, "blocks leaked"
        _step(sched, running, new_token=rng.randrange(50))
        for s in list(running):
            if len(s.token_ids) > s.num_prompt + rng.randrange(2, 9):
                sched.finish(s)
                live.remove(s)
    for s in live:
        sched.finish(s)
    assert alloc.num_free == alloc.num_blocks
    assert sched.prefix.num_hit_tokens > 0, "the workload never hit: the test shows nothing"
    assert alloc.num_evictable < alloc.num_blocks or len(sched.prefix) > 0


def _turns(eng: Engine, turns: int = 3, max_tokens: int = 24) -> list[list[int]]:
    """A conversation: each prompt is the last prompt, its reply, and a new user line."""
    tok = eng.tokenizer
    prompt = tok.encode("User: tell me about rivers and the sea.\nAssistant:", add_special_tokens=False)
    outs = []
    for t in range(turns):
        out = eng.generate_batch([prompt], SamplingParams(max_tokens=max_tokens, temperature=0,
                                                          ignore_eos=True))[0]
        outs.append(out.token_ids)
        prompt = prompt + out.token_ids + tok.encode(f"\nUser: and then {t}?\nAssistant:",
                                                     add_special_tokens=False)
    return outs


@pytest.mark.parametrize("draft", ["none", "suffix+ngram"])
def test_greedy_is_identical_with_the_prefix_cache_on_and_off(fresh_engine, draft):
    on = fresh_engine(draft=draft, dtype="float32", prefix_cache=True, online=False)
    off = fresh_engine(draft=draft, dtype="float32", prefix_cache=False, online=False)
    assert _turns(on) == _turns(off)
    s = on.stats()
    assert s["prefix_hit_tokens"] >= 2 * 16, "later turns must reuse the earlier turns' KV"
    assert "prefix_hit_tokens" not in off.stats()


def test_a_prefix_hit_still_leaves_an_aligned_trace():
    eng = Engine(EngineConfig(model="tiny-llama", draft="eagle", online=True, dtype="float32",
                              trainer=TrainerConfig()))
    try:
        eng.flywheel.pause()
        _turns(eng, turns=2)
        recs = eng.flywheel.buffer.drain()
        assert len(recs) == 2
        rec = recs[1]
        assert rec.start > 0 and rec.start % eng.config.block_size == 0   # starts where the cache ended
        for i in rec.has_target.nonzero()[:, 0].tolist():
            assert rec.target_ids[i, 0] == rec.token_ids[i + 1]
        assert eng.flywheel.collector.open_requests() == 0
    finally:
        eng.close()


def test_exact_under_kv_pressure_with_shared_prefixes(fresh_engine):
    """Twelve concurrent requests over three shared stems in a pool too small for all of them:
    admission shares blocks, preemption recomputes from the cache, allocation evicts cached
    blocks; every output equals the same request served with no prefix cache."""
    stems = ["The history of the river begins in the mountains where ",
             "def parse(line):\n    fields = line.split(',')\n    return ",
             "Dear team, thank you for the update on the quarterly numbers. "]
    prompts = [stems[i % 3] + f"case {i}: " + "x" * (i % 5) for i in range(12)]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    ref = fresh_engine(draft="ngram", dtype="float32", prefix_cache=False, online=False)
    want = [o.token_ids for o in ref.generate_batch(prompts, params)]
    eng = fresh_engine(draft="ngram", dtype="float32", prefix_cache=True, online=False, kv_tokens=640, max_batch=8)
    got = [o.token_ids for o in eng.generate_batch(prompts, params)]
    assert got == want
    s = eng.stats()
    assert s["prefix_hit_tokens"] > 0 and s["num_preemptions"] > 0 and s["prefix_evicted_blocks"] > 0, s
    assert s["kv_blocks_free"] == s["kv_blocks_total"]
