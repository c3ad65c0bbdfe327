"""Per-request isolation: a draft, target-forward or hook failure for one sequence costs that
sequence (its speculation, or at worst its request), never another request's tokens.

Faults are injected by wrapping the engine's proposer / runner from the test; every
surviving greedy output is compared with plain greedy decoding of the same prompt.
"""
from __future__ import annotations

import pytest
import torch

from aurora import SamplingParams
from aurora.engine import isolation

BASES = ["hello world: ", "abc: ", "The quick brown fox: ", "1, 2, 3: ", "POISON: "]


def greedy(n: int = 24) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def sampled(seed: int, n: int = 16) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.9, seed=seed, ignore_eos=True)


def self_repeating(plain, text: str, n: int = 16) -> list[int]:
    """A prompt ending where it began, then the model's own continuation: the ngram draft
    proposes runs the target accepts (so speculation is measurable)."""
    base = plain.encode_prompt(text)
    return base + plain.generate_batch([base], greedy(n))[0].token_ids + base


@pytest.fixture(scope="module")
def prompts(engines):
    plain = engines.get("tiny-llama")
    return [self_repeating(plain, b) for b in BASES]


@pytest.fixture(scope="module")
def want(engines, prompts):
    return [o.token_ids for o in engines.get("tiny-llama").generate_batch(prompts, greedy())]


def test_proposer_failing_for_one_sequence_costs_only_its_speculation(fresh_engine, prompts, want):
    eng = fresh_engine(draft="model:tiny-llama")       # the target's twin: nearly every node accepted
    inner = eng.proposer.propose
    bad = prompts[-1]

    def propose(seqs, ctx):
        if any(s.prompt_ids == bad for s in seqs):
            raise RuntimeError("injected draft failure")
        return inner(seqs, ctx)
    eng.proposer.propose = propose
    outs = eng.generate_batch(prompts, greedy())
    assert [o.finish_reason for o in outs] == ["length"] * 5
    assert [o.token_ids for o in outs] == want
    s = eng.stats()
    assert s["num_errors"] == 0 and s["draft_failures"] == 1 and s["draft_off"] == []
    assert s["accepted_length"] > 3, "the healthy sequences lost their speculation"
    assert outs[-1].stats["accepted_length"] == 1.0        # the poisoned one ran without a draft
    assert s["kv_blocks_free"] == s["kv_blocks_total"]


def test_invalid_trees_are_dropped(fresh_engine, prompts, want):
    """A tree with out-of-range token ids or non-finite q never reaches the target."""
    eng = fresh_engine(draft="ngram")
    inner = eng.proposer.propose

    def propose(seqs, ctx):
        trees = inner(seqs, ctx)
        for seq, tree in zip(seqs, trees):
            if seq.prompt_ids == prompts[-1] and len(tree):
                tree.token_ids[0] = ctx.vocab_size + 7
        return trees
    eng.proposer.propose = propose
    outs = eng.generate_batch(prompts, greedy())
    assert [o.token_ids for o in outs] == want
    assert eng.stats()["draft_failures"] >= 1 and eng.stats()["num_errors"] == 0
    tree = isolation.DraftTree.chain([1, 2])
    tree.q_probs = torch.tensor([[0.5, float("nan")], [1.0, 0.0]])
    assert not isolation.valid_tree(tree, 10)
    tree.q_probs = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    assert isolation.valid_tree(tree, 10) and not isolation.valid_tree(tree, 2)


def _poison_head(head) -> None:
    with torch.no_grad():
        for p in head.parameters():
            p.fill_(float("nan"))


def test_a_learned_draft_that_keeps_failing_is_switched_off(fresh_engine, prompts, want):
    """NaN weights in the serving slot (a bad swap): sampled proposals raise in `draw`.
    Each failing sequence falls back to ngram; after MAX_FAILED of them the learned draft is
    off for everyone; a new weights version switches it back on."""
    eng = fresh_engine(draft="eagle+ngram")
    learned = eng.proposer.learned
    healthy = {k: v.clone() for k, v in learned.head.state_dict().items()}
    _poison_head(learned.head)
    n = isolation.MAX_FAILED + 4
    params = [greedy()] * len(prompts) + [sampled(i) for i in range(n)]
    outs = eng.generate_batch(prompts + [f"sampled prompt {i}" for i in range(n)], params)
    assert all(o.finish_reason == "length" and not o.error for o in outs)
    assert [o.token_ids for o in outs[:len(prompts)]] == want
    s = eng.stats()
    assert s["learned_draft_off"] and s["draft_switch_offs"] == 1 and s["draft_off"] == ["eagle+ngram"]
    assert isolation.MAX_FAILED <= s["draft_failures"] <= n and s["num_errors"] == 0
    # the next (healthy) weights get a fresh chance
    learned.begin_write().load_state_dict(healthy)
    learned.stage(learned.version + 1)
    assert learned.flip()
    eng.generate_batch(["after the swap"], [sampled(99)])
    s = eng.stats()
    assert not s["learned_draft_off"] and s["draft_off"] == [] and s["draft_switch_offs"] == 1


def test_a_single_eagle_draft_switched_off_means_no_speculation(fresh_engine):
    eng = fresh_engine(draft="eagle")
    _poison_head(eng.proposer.head)
    n = isolation.MAX_FAILED + 2
    outs = eng.generate_batch([f"p{i}" for i in range(n)], [sampled(i) for i in range(n)])
    assert all(o.finish_reason == "length" for o in outs)
    s = eng.stats()
    assert s["learned_draft_off"] and s["draft_off"] == ["eagle"] and s["num_errors"] == 0


def _fail_forward(eng, when):
    inner = eng.runner.forward

    def forward(batch):
        if when(batch):
            raise RuntimeError("injected target failure")
        return inner(batch)
    eng.runner.forward = forward


def test_target_failure_attributable_to_one_sequence(fresh_engine, prompts, want):
    """The forward fails whenever the poisoned sequence is in the batch: it alone ends with an
    error; the others keep exact greedy output."""
    eng = fresh_engine(draft="ngram")
    bad = prompts[-1]

    def poisoned(batch):
        seq = next((s for s in eng.scheduler.running if s.prompt_ids == bad), None)
        return seq is not None and seq.block_ids and seq.block_ids[0] in batch.block_tables[:, 0].tolist()
    _fail_forward(eng, poisoned)
    outs = eng.generate_batch(prompts, greedy())
    assert [o.finish_reason for o in outs] == ["length"] * 4 + ["error"]
    assert "target forward failed" in outs[-1].error
    assert [o.token_ids for o in outs[:4]] == want[:4]
    s = eng.stats()
    assert s["num_errors"] == 1 and s["num_forward_retries"] >= 1
    assert s["kv_blocks_free"] == s["kv_blocks_total"]


def test_target_failure_only_in_a_batch_loses_nobody(fresh_engine, prompts, want):
    """A failure no single sequence shows (e.g. a batch-size-dependent one): every sequence is
    run alone for that step, and nobody's output changes."""
    eng = fresh_engine(draft="ngram")
    calls = {"n": 0}

    def batched(batch):
        calls["n"] += 1
        return len(batch.seq_lens) > 1 and calls["n"] % 3 == 0
    _fail_forward(eng, batched)
    outs = eng.generate_batch(prompts, greedy())
    assert [o.finish_reason for o in outs] == ["length"] * 5
    assert [o.token_ids for o in outs] == want
    assert eng.stats()["num_forward_retries"] >= 2 and eng.stats()["num_errors"] == 0


def test_failing_step_hooks_and_observers_lose_nothing(fresh_engine, prompts, want):
    eng = fresh_engine(draft="ngram")

    def boom(*args):
        raise RuntimeError("injected hook failure")
    eng.step_hooks.append(boom)
    eng.before_step.append(boom)
    eng.proposer.observe = boom
    eng.proposer.release = boom
    outs = eng.generate_batch(prompts, greedy())
    assert [o.token_ids for o in outs] == want
    s = eng.stats()
    assert s["num_errors"] == 0 and s["kv_blocks_free"] == s["kv_blocks_total"]
