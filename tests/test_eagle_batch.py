"""The eagle proposer drafts all sequences of a step together (one head call per tree level
over a block-diagonal mask); every sequence's tree must equal the tree it gets when proposed
alone from the same cached state (fp32, greedy, chain and tree shapes), while requests of
different lengths join and leave."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from aurora import SamplingParams, SpecConfig


@pytest.mark.parametrize("shape", ["chain", "static", "dynamic"])
def test_batched_eagle_proposals_equal_one_sequence_at_a_time(fresh_engine, shape):
    eng = fresh_engine("tiny-llama", "eagle", SpecConfig(shape=shape, depth=4, width=2, max_nodes=8))
    proposer = eng.proposer
    with torch.no_grad():                     # make attention decide the argmax: a row that sees
        attn = proposer.head.midlayer.self_attn   # another sequence's rows changes the tree
        attn.v_proj.weight.mul_(30.0)
        attn.q_proj.weight.mul_(3.0)
    calls = {"batched": 0, "checked_trees": 0}
    batched = proposer.propose

    def checking(seqs, ctx):
        before = [copy.copy(s.draft_state) for s in seqs]          # each sequence's cached context
        trees = batched(seqs, ctx)
        if len(seqs) > 1:
            calls["batched"] += 1
            after = [s.draft_state for s in seqs]
            for seq, state, tree in zip(seqs, before, trees):
                seq.draft_state = copy.copy(state)
                alone = batched([seq], ctx)[0]
                assert (alone.token_ids, alone.parents) == (tree.token_ids, tree.parents), seq.request_id
                mine, ref = after[seqs.index(seq)]["eagle"], seq.draft_state["eagle"]
                torch.testing.assert_close(mine["h"], ref["h"], rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(mine["k"], ref["k"], rtol=1e-4, atol=1e-4)
                calls["checked_trees"] += len(tree) > 0
            for seq, state in zip(seqs, after):
                seq.draft_state = state
        return trees

    proposer.propose = checking
    prompts = ["the cat sat on the mat and the cat", "one two three four five six", "a b a b a b a b",
               "hello world, hello", "x"]
    params = [SamplingParams(max_tokens=12 + 5 * i, temperature=0, ignore_eos=True) for i in range(len(prompts))]
    outs = eng.generate_batch(prompts, params)
    assert [len(o.token_ids) for o in outs] == [p.max_tokens for p in params]
    assert calls["batched"] >= 5 and calls["checked_trees"] >= 10


def test_confidence_cut_expands_only_confident_paths(fresh_engine):
    """`eagle_min_prob`: a node gets children only while its path probability under the draft is
    at least the cut. The cut tree is the uncut tree pruned (same tokens where both expand), every
    expanded node clears the cut, and some node that the uncut tree expands is cut."""
    import dataclasses

    from aurora.drafts import ProposeContext
    default = next(f.default for f in dataclasses.fields(SpecConfig) if f.name == "eagle_min_prob")
    assert default > 0, "serving cuts unconfident paths by default (conftest turns it off for tests)"
    eng = fresh_engine("tiny-llama", "eagle", SpecConfig(shape="static", depth=4, width=2, max_nodes=30))
    proposer = eng.proposer
    with torch.no_grad():                     # a peaked head: path probabilities spread over (0, 1]
        proposer.head.lm_head.weight.mul_(40.0)
    seen = {"compared": 0, "cut_somewhere": 0}
    propose = proposer.propose

    def comparing(seqs, ctx):
        states = [copy.copy(s.draft_state) for s in seqs]
        full = propose(seqs, ctx)
        probs = sorted(math.exp(sum(t.logprobs[a] for a in _path(t, n))) for t in full for n in range(len(t))
                       if t.depths[n] < ctx.spec.depth)
        if not probs:
            return full
        cut_p = probs[len(probs) // 2]                     # the median expandable path probability
        for seq, st in zip(seqs, states):
            seq.draft_state = copy.copy(st)
        cut = propose(seqs, ProposeContext(dataclasses.replace(ctx.spec, eagle_min_prob=cut_p), ctx.vocab_size))
        for a, b in zip(full, cut):
            keep = {}                                      # cut node -> full node with the same path
            for n in range(len(b)):
                parent = keep[b.parents[n]] if b.parents[n] >= 0 else -1
                keep[n] = a.find_child(parent, b.token_ids[n])
                assert keep[n] >= 0, "the cut tree is a pruning of the uncut tree"
                if b.parents[n] >= 0:
                    assert math.exp(sum(b.logprobs[x] for x in _path(b, b.parents[n]))) >= cut_p * (1 - 1e-6)
            seen["cut_somewhere"] += len(b) < len(a)
            seen["compared"] += 1
        return full

    proposer.propose = comparing
    eng.generate_batch(["the cat sat on the mat and the cat", "one two three four five six"],
                       SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    assert seen["compared"] >= 10 and seen["cut_somewhere"] >= 5, seen


def _path(tree, node: int) -> list[int]:
    out = []
    while node >= 0:
        out.append(node)
        node = tree.parents[node]
    return out


def test_default_learned_draft_proposes_top2_siblings(fresh_engine):
    """The default SpecConfig gives the learned draft trees, not chains: the root gets the
    draft's two best tokens as sibling children (a chain would give one)."""
    eng = fresh_engine("tiny-llama", "eagle")
    proposer, seen = eng.proposer, []
    batched = proposer.propose

    def recording(seqs, ctx):
        trees = batched(seqs, ctx)
        seen.extend(sum(p == -1 for p in t.parents) for t in trees if len(t))
        return trees

    proposer.propose = recording
    eng.generate_batch(["the cat sat on the mat and the cat"], SamplingParams(max_tokens=6, temperature=0))
    assert seen and max(seen) == 2, seen
