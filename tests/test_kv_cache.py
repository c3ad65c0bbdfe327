"""KV bookkeeping on CPU in milliseconds: the block allocator (no double hand-out, failures
leave it intact), slot mapping, moves across all layers, and the scheduler's admission /
preemption accounting (every block comes back)."""
from __future__ import annotations

import pytest
import torch

from aurora.engine.kv_cache import BlockAllocator, KVCache, OutOfBlocks, blocks_needed
from aurora.engine.sampling import make_generator
from aurora.engine.scheduler import Scheduler
from aurora.engine.sequence import Sequence, Status
from aurora.types import SamplingParams

# ----------------------------------------------------------------------------- allocator

def test_allocate_distinct_blocks_until_exhausted():
    alloc = BlockAllocator(8)
    a = alloc.allocate(3)
    b = alloc.allocate(5)
    assert len(set(a + b)) == 8 and set(a + b) == set(range(8))
    assert alloc.num_free == 0
    with pytest.raises(OutOfBlocks):
        alloc.allocate(1)
    alloc.allocate(0)  # asking for nothing is fine even when full
    alloc.free(a)
    assert alloc.num_free == 3
    again = alloc.allocate(3)
    assert sorted(again) == sorted(a)           # only freed blocks are handed out again
    assert not set(again) & set(b)


def test_exhaustion_does_not_corrupt_free_list():
    alloc = BlockAllocator(6)
    held = alloc.allocate(4)
    free_before = sorted(alloc._free)
    with pytest.raises(OutOfBlocks):
        alloc.allocate(3)
    assert alloc.num_free == 2 and sorted(alloc._free) == free_before
    rest = alloc.allocate(2)                     # the two free blocks are still usable
    assert not set(rest) & set(held)
    alloc.free(held + rest)
    assert alloc.num_free == 6 and sorted(alloc._free) == list(range(6))


def test_double_free_and_foreign_free_raise():
    alloc = BlockAllocator(4)
    ids = alloc.allocate(2)
    alloc.free(ids)
    with pytest.raises(ValueError):
        alloc.free([ids[0]])
    with pytest.raises(ValueError):
        alloc.free([99])
    assert alloc.num_free == 4 and sorted(alloc._free) == [0, 1, 2, 3]
    # after the errors the allocator still never hands out a block twice
    got = alloc.allocate(4)
    assert sorted(got) == [0, 1, 2, 3]


def test_out_of_blocks_is_runtime_error():
    assert issubclass(OutOfBlocks, RuntimeError)


@pytest.mark.parametrize("n,bs,want", [(0, 16, 0), (1, 16, 1), (16, 16, 1), (17, 16, 2), (33, 4, 9)])
def test_blocks_needed(n, bs, want):
    assert blocks_needed(n, bs) == want


# ----------------------------------------------------------------------------- KV cache

def _cache(num_layers=3, num_blocks=8, block_size=4, kv_heads=2, head_dim=5):
    return KVCache(num_layers, num_blocks, block_size, kv_heads, head_dim, torch.float32, torch.device("cpu"))


def test_slots_follow_block_table():
    cache = _cache(block_size=4)
    block_ids = [5, 2, 7]
    slots = cache.slots(block_ids, 0, 12)
    assert slots == [20, 21, 22, 23, 8, 9, 10, 11, 28, 29, 30, 31]
    assert cache.slots(block_ids, 3, 6) == [23, 8, 9]
    assert cache.slots(block_ids, 5, 5) == []


def test_layer_views_write_through():
    cache = _cache()
    k, v = cache.layer(1)
    k[3] = 1.0
    v[4] = 2.0
    assert torch.all(cache.data[1, 0, 3] == 1.0) and torch.all(cache.data[1, 1, 4] == 2.0)
    assert cache.data[0].abs().sum() == 0 and cache.data[2].abs().sum() == 0


def test_move_copies_every_layer_k_and_v():
    cache = _cache()
    torch.manual_seed(0)
    cache.data.copy_(torch.randn_like(cache.data))
    before = cache.data.clone()
    src, dst = [9, 13, 30], [1, 2, 3]
    cache.move(src, dst)
    for layer in range(cache.data.shape[0]):
        for kv in range(2):
            assert torch.equal(cache.data[layer, kv, dst], before[layer, kv, src])
    untouched = [s for s in range(cache.data.shape[2]) if s not in dst]
    assert torch.equal(cache.data[:, :, untouched], before[:, :, untouched])


def test_move_overlapping_reads_old_values():
    """Compacting an accepted path shifts slots left: sources may be later destinations."""
    cache = _cache()
    cache.data.copy_(torch.arange(cache.data.shape[2], dtype=torch.float32)[None, None, :, None, None]
                     .expand_as(cache.data))
    cache.move([3, 5, 6], [2, 3, 4])
    got = cache.data[0, 0, :8, 0, 0].tolist()
    assert got == [0, 1, 3, 5, 6, 5, 6, 7]
    cache.move([], [])                            # no-op


# ----------------------------------------------------------------------------- scheduler

def _seq(rid: str, prompt_len: int) -> Sequence:
    params = SamplingParams(max_tokens=100, temperature=0)
    return Sequence(rid, list(range(3, 3 + prompt_len)), params, make_generator(0))


def _run_step(sched: Scheduler, seqs: list[Sequence], new_tokens: int = 1) -> None:
    """Pretend the step ran: all uncached tokens get KV, one token is appended each."""
    for s in seqs:
        s.num_cached = len(s.token_ids)
        s.token_ids += [7] * new_tokens
        sched.trim(s)


def _owned(sched: Scheduler) -> list[int]:
    return [b for s in list(sched.running) + list(sched.waiting) for b in s.block_ids]


def _check_accounting(sched: Scheduler) -> None:
    alloc = sched.cache.allocator
    owned = _owned(sched)
    assert len(owned) == len(set(owned)), "a block is owned by two sequences"
    assert not set(owned) & set(alloc._free), "an owned block is also on the free list"
    assert len(owned) + alloc.num_free == alloc.num_blocks, "blocks leaked"
    for s in sched.waiting:
        assert s.block_ids == [] and s.status == Status.WAITING
    for s in sched.running:
        assert s.status == Status.RUNNING
        assert len(s.block_ids) * sched.cache.block_size >= len(s.token_ids)


def test_scheduler_admits_by_free_blocks_and_max_batch():
    cache = _cache(num_blocks=8, block_size=4)
    sched = Scheduler(cache, max_batch=2)
    a, b, c = _seq("a", 6), _seq("b", 6), _seq("c", 6)
    for s in (a, b, c):
        sched.add(s)
    got = sched.schedule(tree_budget=4)
    assert got == [a, b]                          # max_batch caps admission; FCFS order
    assert [s.request_id for s in sched.waiting] == ["c"]
    assert len(a.block_ids) == blocks_needed(6, 4)   # prompt: no tree budget yet
    _check_accounting(sched)


def test_scheduler_preempts_newest_and_returns_blocks():
    cache = _cache(num_blocks=8, block_size=4)
    sched = Scheduler(cache, max_batch=8)
    seqs = [_seq(f"s{i}", 5) for i in range(3)]
    for s in seqs:
        sched.add(s)
    budget = 3
    preempted = set()
    for _ in range(40):
        running = sched.schedule(budget)
        _check_accounting(sched)
        for s in running:                          # every running sequence has room for its step
            extra = budget if s.num_uncached == 1 else 0
            assert len(s.block_ids) * cache.block_size >= len(s.token_ids) + extra
        preempted |= {s.request_id for s in seqs if s.num_preemptions}
        if not running:
            break
        _run_step(sched, running)
    assert preempted, "a pool of 8 blocks for 3 growing sequences must preempt"
    victim = next(s for s in seqs if s.num_preemptions)
    assert victim.num_cached <= len(victim.token_ids)
    for s in seqs:
        sched.finish(s)
        assert s.status == Status.FINISHED and s.block_ids == []
    assert cache.allocator.num_free == cache.allocator.num_blocks
    assert not sched.running and not sched.waiting


def test_preempt_resets_cache_state_and_requeues_first():
    cache = _cache(num_blocks=8, block_size=4)
    sched = Scheduler(cache, max_batch=8)
    a, b, c = _seq("a", 5), _seq("b", 5), _seq("c", 30)
    for s in (a, b, c):
        sched.add(s)
    sched.schedule(tree_budget=2)                 # a, b fit; c (30 tokens = 8 blocks) waits
    assert sched.running == [a, b] and list(sched.waiting) == [c]
    _run_step(sched, [a, b])
    sched.preempt(b)
    assert b.num_cached == 0 and b.block_ids == [] and b.features is None
    assert b.num_preemptions == 1 and b.status == Status.WAITING
    assert list(sched.waiting) == [b, c]          # preempted work resumes before new work
    assert b.num_uncached == len(b.token_ids)     # recomputed from scratch, tokens kept
    _check_accounting(sched)


def test_trim_frees_blocks_of_dropped_tree_nodes():
    cache = _cache(num_blocks=8, block_size=4)
    sched = Scheduler(cache, max_batch=4)
    s = _seq("a", 5)
    sched.add(s)
    sched.schedule(tree_budget=0)
    s.num_cached = 5
    s.token_ids.append(9)                          # decode: the pending token needs a tree budget
    sched.schedule(tree_budget=12)
    assert len(s.block_ids) == blocks_needed(6 + 12, 4)
    s.num_cached = 7                               # one node accepted
    s.token_ids += [9]
    sched.trim(s)
    assert len(s.block_ids) == blocks_needed(7, 4)
    _check_accounting(sched)


def test_finish_releases_waiting_and_running():
    cache = _cache(num_blocks=4, block_size=4)
    sched = Scheduler(cache, max_batch=4)
    a, b = _seq("a", 8), _seq("b", 12)
    sched.add(a)
    sched.add(b)
    sched.schedule(tree_budget=0)
    assert sched.running == [a] and list(sched.waiting) == [b]
    sched.finish(b)                                # abort while waiting
    sched.finish(a)
    sched.finish(a)                                # idempotent
    assert cache.allocator.num_free == 4 and not sched.has_work


# ----------------------------------------------------------------------------- CPU attention fast paths

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("kind", ["prompt", "decode", "tree_batch", "ragged"])
def test_attention_fast_paths_match_the_general_plan(dtype, contiguous, kind):
    """The dispatcher's shortcuts (mask-free causal prompt, contiguous view, fp32 compute for
    half pools, ragged steps attending group by group) give what the general masked plan gives
    in fp64."""
    from aurora.kernels import paged_tree_attention
    from aurora.kernels.reference import paged_tree_attention_ref, plan_paged
    g = torch.Generator().manual_seed(1)
    bs, heads, kv_heads, dim = 4, 6, 2, 8
    # ragged: a fresh prompt, a decode token, a prompt chunk after a cached prefix, a draft tree
    lens = {"prompt": [23], "decode": [30], "tree_batch": [30, 17], "ragged": [40, 30, 61, 17]}[kind]
    n_new = {"prompt": [23], "decode": [1], "tree_batch": [3, 1], "ragged": [40, 1, 37, 3]}[kind]
    blocks = [-(-n // bs) for n in lens]
    order = list(range(sum(blocks) + 2)) if contiguous else torch.randperm(sum(blocks) + 2, generator=g).tolist()
    table = torch.zeros(len(lens), max(blocks), dtype=torch.int32)
    taken = 0
    for i, b in enumerate(blocks):
        table[i, :b] = torch.tensor(order[taken:taken + b])
        taken += b
    num_tokens = sum(n_new)
    tree_mask = torch.zeros(num_tokens, max(n_new), dtype=torch.bool)
    start, positions = 0, []
    for n, length in zip(n_new, lens):
        tree_mask[start:start + n, :n] = torch.ones(n, n, dtype=torch.bool).tril()
        positions += range(length - n, length)
        start += n
    args = dict(q=torch.randn(num_tokens, heads, dim, generator=g).to(dtype),
                k_cache=torch.randn(len(order) * bs, kv_heads, dim, generator=g).to(dtype),
                v_cache=torch.randn(len(order) * bs, kv_heads, dim, generator=g).to(dtype),
                block_tables=table, seq_lens=torch.tensor(lens, dtype=torch.int32),
                query_start=torch.tensor([0] + list(torch.tensor(n_new).cumsum(0)), dtype=torch.int32),
                tree_mask=tree_mask, positions=torch.tensor(positions), block_size=bs, scale=dim ** -0.5)
    step_cache: dict = {}
    fast = paged_tree_attention(**args, step_cache=step_cache, impl="reference")
    plan = step_cache[("plan", None)]
    if kind == "ragged":        # each prompt alone (the fresh one mask-free), decode + tree together
        groups = {(r.start, r.stop) if isinstance(r, slice) else tuple(r.tolist()): sub for r, sub in plan["groups"]}
        assert sorted(groups) == [(0, 40), (40, 78, 79, 80), (41, 78)]
        assert groups[0, 40]["causal"] and not groups[41, 78]["causal"] and not groups[40, 78, 79, 80]["causal"]
        assert ("folded_mask", 3) in groups[40, 78, 79, 80]       # 6 query heads over 2 kv heads: folded
    else:
        assert plan["causal"] == (kind == "prompt")
        assert (plan["contiguous"] is not None) == (contiguous and len(lens) == 1)
    general = plan_paged(args["block_tables"], args["seq_lens"], args["query_start"], tree_mask,
                         args["positions"], bs, num_tokens)
    general["contiguous"] = None
    exact = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in args.items()}
    want = paged_tree_attention_ref(**exact, plan=general)
    assert fast.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(fast.double(), want, atol=tol, rtol=tol)
