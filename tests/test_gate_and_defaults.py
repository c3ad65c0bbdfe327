"""Composed-draft gate, CPU dtype choice, serving/trainer thread split, rollback."""
from __future__ import annotations

import copy

import torch

from aurora import Engine, EngineConfig, SamplingParams, TrainerConfig
from aurora.config import SpecConfig
from aurora.drafts import ProposeContext
from aurora.drafts.base import Proposer
from aurora.drafts.compose import EXPLORE_EVERY, ComposedProposer
from aurora.engine.tree import DraftTree
from aurora.models import loader


class _Fixed(Proposer):
    def __init__(self, tokens, learnable):
        self.tokens, self.learnable, self.calls = tokens, learnable, 0

    def propose(self, seqs, ctx):
        self.calls += 1
        return [DraftTree.chain(self.tokens) for _ in seqs]


class _Seq:
    class params:
        greedy = True


CTX = ProposeContext(SpecConfig(), vocab_size=100)


def _run(comp, learned_accepted: bool, steps: int):
    for _ in range(steps):
        tree = comp.propose([_Seq()], CTX)[0]
        path = [0, 1] if learned_accepted and comp.gate_open else []
        comp.observe([tree], [(path, 0)])


def test_gate_closes_for_a_useless_learned_draft():
    learned, ngram = _Fixed([7, 8], True), _Fixed([9], False)
    comp = ComposedProposer([learned, ngram])
    _run(comp, learned_accepted=False, steps=8 * EXPLORE_EVERY)
    assert learned.calls <= 8 + 1                     # explored only every EXPLORE_EVERY-th step
    assert ngram.calls == 8 * EXPLORE_EVERY


def test_gate_stays_open_when_learned_tokens_are_accepted():
    learned, ngram = _Fixed([7, 8], True), _Fixed([9], False)
    comp = ComposedProposer([learned, ngram])
    _run(comp, learned_accepted=True, steps=40)
    assert learned.calls == 40 and comp.gate_open


def test_shared_nodes_do_not_count_as_learned_gain():
    learned, ngram = _Fixed([7, 8], True), _Fixed([7, 8], False)   # ngram proposes the same chain
    comp = ComposedProposer([learned, ngram])
    _run(comp, learned_accepted=True, steps=4 * EXPLORE_EVERY)
    assert learned.calls < 4 * EXPLORE_EVERY


def test_auto_dtype(monkeypatch):
    monkeypatch.setattr(loader, "cpu_has_fast_bf16", lambda: True)
    assert loader.resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16
    monkeypatch.setattr(loader, "cpu_has_fast_bf16", lambda: False)
    assert loader.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert loader.resolve_dtype("float32", torch.device("cpu")) == torch.float32


def test_serving_threads_leave_the_trainer_its_cores(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    eng = Engine(EngineConfig(model="tiny-llama", draft="eagle", online=True, dtype="float32",
                              trainer=TrainerConfig(threads=1)))
    try:
        assert eng.serve_threads() == 3
    finally:
        eng.close()
    eng = Engine(EngineConfig(model="tiny-llama", draft="ngram", online=False, dtype="float32", threads=2))
    try:
        assert eng.serve_threads() == 2
    finally:
        eng.close()


def test_rollback_restores_previous_weights_through_the_trainer():
    eng = Engine(EngineConfig(model="tiny-llama", draft="eagle", online=True, dtype="float32"))
    try:
        fw = eng.flywheel
        fw.pause()
        before = {k: v.clone() for k, v in fw.published.state_dict().items()}
        with torch.no_grad():
            fw.published.fc.weight.add_(1.0)
        old = copy.deepcopy(fw.published)
        old.load_state_dict(before)
        fw._rollback_to = old
        fw._apply_rollback()
        assert fw.rollbacks == 1 and fw._rollback_to is None
        assert torch.equal(fw.published.fc.weight, before["fc.weight"])
        assert torch.equal(fw.trainer.head.fc.weight, before["fc.weight"])
        eng.generate_batch(["abc"], SamplingParams(max_tokens=4, temperature=0))   # flips at a boundary
        assert torch.equal(eng.proposer.head.fc.weight, before["fc.weight"].to(eng.proposer.head.fc.weight.dtype))
    finally:
        eng.close()
