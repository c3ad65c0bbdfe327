"""The eagle proposer drafts all sequences of a step together (one head call per tree level
over a block-diagonal mask); every sequence's tree must equal the tree it gets when proposed
alone from the same cached state (fp32, greedy, chain and tree shapes), while requests of
different lengths join and leave."""
from __future__ import annotations

import copy

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
