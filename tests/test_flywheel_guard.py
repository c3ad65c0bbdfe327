"""Flywheel guard and rollback on recent held-back traces, vocabulary rebuild, target init,
and greedy exactness while the trainer swaps often."""
from __future__ import annotations

import copy
import time

import torch

from aurora import Engine, EngineConfig, SamplingParams, TrainerConfig
from aurora.flywheel.vocab import init_from_target, remap_head

GREEDY = SamplingParams(max_tokens=40, temperature=0)
PROMPTS = ["the cat sat on ", "def f(x): return", "hello hello ", "1, 2, 3, 4"]


def _engine(draft="eagle", **trainer):
    return Engine(EngineConfig(model="tiny-llama", draft=draft, online=True, dtype="float32",
                               trainer=TrainerConfig(**trainer)))


def _feed(eng, rounds=1):
    for _ in range(rounds):
        eng.generate_batch(PROMPTS, GREEDY)
    eng.flywheel.trainer.add_records(eng.flywheel.buffer.drain())


def _noise(head, scale=3.0):
    bad = copy.deepcopy(head)
    with torch.no_grad():
        for p in bad.parameters():
            p.add_(torch.randn_like(p) * scale)
    return bad


def _trained(eng, steps=150):
    fw = eng.flywheel
    for _ in range(steps):
        fw.trainer.train_step()
    return fw.trainer.evaluate(fw.trainer.head)


def test_guard_rejects_a_worse_candidate_and_rollback_restores_on_recent_traces():
    eng = _engine(publish_every_steps=10**6, publish_every_s=1e9, holdout_every=3, max_passes=1e9, span=32)
    fw = eng.flywheel
    fw.pause()
    try:
        _feed(eng, rounds=3)
        assert fw.trainer.holdout and fw.trainer.replay
        good_score = _trained(eng)
        fw._publish(fw.trainer.head)                               # v1: the trained draft
        good = copy.deepcopy(fw.published)
        assert good_score > fw.trainer.evaluate(_noise(good)) + 0.1
        # guard: a noisy candidate scores below the active draft on the held-back traces
        fw.trainer.head.load_state_dict(_noise(good).state_dict())
        version = fw.version
        fw._maybe_publish()
        assert fw.rejected_candidates == 1 and fw.version == version
        # a bad draft goes live (guard bypassed); traffic after the swap; rollback on those traces
        fw._publish(_noise(good))
        time.sleep(0.01)
        _feed(eng)
        fw.trainer.head.load_state_dict(_noise(good).state_dict())
        fw._maybe_publish()
        assert fw.rollbacks == 1
        for (k, a), (_, b) in zip(fw.published.state_dict().items(), good.state_dict().items()):
            assert torch.equal(a, b), k
        assert torch.equal(fw.trainer.head.fc.weight, good.fc.weight)
        assert fw.stats()["guard"]["previous"] > fw.stats()["guard"]["active"]
    finally:
        eng.close()


def test_no_rollback_for_a_domain_shift_alone():
    """Live tau falling because traffic changed is not a reason to roll back: the previous and
    the active draft are judged on the same recent traces."""
    eng = _engine(publish_every_steps=10**6, publish_every_s=1e9, holdout_every=3, max_passes=1e9, span=32)
    fw = eng.flywheel
    fw.pause()
    try:
        _feed(eng, rounds=3)
        _trained(eng, 60)
        fw._publish(fw.trainer.head)
        _trained(eng, 60)
        fw._publish(fw.trainer.head)                               # v2, better or equal on the old domain
        time.sleep(0.01)
        eng.generate_batch(["zzzz qqqq zzzz ", "9 8 7 6 5 "], SamplingParams(max_tokens=40, temperature=0))
        fw.trainer.add_records(fw.buffer.drain())
        fw._maybe_publish()
        assert fw.rollbacks == 0
    finally:
        eng.close()


def test_busy_share_is_earned_by_guard_verdicts():
    """Training that stops beating the active draft halves the trainer's busy share (down to
    min_busy_share); a candidate that beats it by earn_gain doubles it back (up to busy_share)."""
    eng = _engine(publish_every_steps=10**6, publish_every_s=1e9, holdout_every=3, max_passes=1e9, span=32,
                  busy_share=0.2, min_busy_share=0.04, earn_gain=0.01, guard_share=1.0)
    fw = eng.flywheel
    fw.pause()
    try:
        _feed(eng, rounds=3)
        start = copy.deepcopy(fw.published)
        assert fw.stats()["busy_share"] == 0.2
        shares = []
        assert fw.trainer.evaluate(start) > 0
        for _ in range(3):                                         # candidates no better than the active draft
            fw.trainer.head.load_state_dict(start.state_dict())   # (a noisy one can beat an untrained draft)
            fw._maybe_publish()
            shares.append(fw.budget.share)
        assert shares == [0.1, 0.05, 0.04] and fw.share_cuts == 3
        fw.trainer.head.load_state_dict(start.state_dict())
        cand = _trained(eng)                                       # better than the untrained active draft
        assert cand > fw.trainer.evaluate(fw.published) * 1.01
        fw._maybe_publish()
        assert fw.budget.share == 0.08
        st = fw.stats()
        assert st["busy_share"] == 0.08 and st["share_cuts"] == 3
        fw._earn(float("nan"), float("nan"))                       # nothing judged: unchanged
        assert fw.budget.share == 0.08
    finally:
        eng.close()
    unlimited = _engine(busy_share=1.0)
    try:
        unlimited.flywheel._earn(0.5, 1.0)                         # busy_share 1: never limited
        assert unlimited.flywheel.budget.share == 1.0
    finally:
        unlimited.close()


def test_guard_time_is_capped():
    eng = _engine(publish_every_steps=1, holdout_every=3, guard_share=0.1, span=32, max_passes=1e9)
    fw = eng.flywheel
    try:
        for _ in range(4):
            eng.generate_batch(PROMPTS, GREEDY)
        end = time.time() + 60
        while time.time() < end and fw.trainer.steps < 40:
            time.sleep(0.1)
        fw.pause()
        time.sleep(0.3)
        st = fw.stats()
        assert st["steps"] >= 40 and st["guard_s"] > 0
        assert st["guard_fraction"] <= 0.1 + 0.05                 # one evaluation may overshoot
    finally:
        eng.close()


def _plain_greedy() -> list[list[int]]:
    """The reference: plain greedy (no draft, no trainer) on PROMPTS, fp32."""
    ref = Engine(EngineConfig(model="tiny-llama", draft="none", online=False, dtype="float32"))
    try:
        return [o.token_ids for o in ref.generate_batch(PROMPTS, GREEDY)]
    finally:
        ref.close()


def test_vocabulary_rebuild_remaps_and_stays_exact():
    expected = _plain_greedy()
    eng = _engine(draft="eagle+ngram", draft_vocab=48, publish_every_steps=2, publish_every_s=0.1, guard=False)
    try:
        before = eng.flywheel.trainer.head.d2t.clone()
        for _ in range(6):
            assert [o.token_ids for o in eng.generate_batch(PROMPTS, GREEDY)] == expected
        fw = eng.flywheel
        end = time.time() + 60
        while time.time() < end and not (fw.vocab_rebuilds and fw.swaps):
            time.sleep(0.05)
        assert fw.vocab_rebuilds >= 1 and not torch.equal(fw.trainer.head.d2t, before)
        frequent = [t for t, _ in fw.vocab.counts.most_common(10)]
        assert set(frequent) <= set(fw.trainer.head.d2t.tolist())
        for _ in range(3):
            assert [o.token_ids for o in eng.generate_batch(PROMPTS, GREEDY)] == expected
        assert fw.error is None
    finally:
        eng.close()


def test_remap_takes_new_rows_from_the_target():
    eng = Engine(EngineConfig(model="tiny-llama", draft="eagle", online=False, dtype="float32",
                              trainer=TrainerConfig(draft_vocab=16)))
    try:
        head = copy.deepcopy(eng.proposer.head)
        src = eng.runner.lm_head.weight
        new = torch.arange(8, 24)
        kept = remap_head(head, new, src)
        assert kept == 0.5
        assert torch.equal(head.lm_head.weight[8:], src[16:24].to(head.lm_head.weight))
    finally:
        eng.close()


def test_fresh_draft_starts_from_the_target_lm_head():
    on = _engine(draft_vocab=64)
    off = _engine(draft_vocab=64, init_from_target=False)
    try:
        src = on.runner.lm_head.weight
        for eng, expect in ((on, True), (off, False)):
            eng.flywheel.pause()
            for head in list(eng.proposer.slots) + [eng.flywheel.trainer.head]:
                same = torch.allclose(head.lm_head.weight.float(), src[head.d2t].float())
                assert same == expect
    finally:
        on.close()
        off.close()


def test_init_from_target_matches_target_logits_on_target_hidden():
    eng = Engine(EngineConfig(model="tiny-llama", draft="eagle", online=False, dtype="float32"))
    try:
        head = copy.deepcopy(eng.proposer.head)
        init_from_target(head, eng.runner)
        inner = eng.runner.model.model
        pre = torch.randn(5, head.norm.weight.shape[0])
        target = eng.runner.logits_from_hidden(inner.norm(pre))
        assert torch.allclose(head.logits(pre), target[:, head.d2t], atol=1e-4)
    finally:
        eng.close()


def test_greedy_exact_while_new_trainer_swaps_often():
    expected = _plain_greedy()
    eng = _engine(draft="eagle+ngram", publish_every_steps=1, publish_every_s=0.05, guard=False,
                  busy_share=1.0, span=16, batch_tokens=128)
    try:
        for _ in range(10):
            assert [o.token_ids for o in eng.generate_batch(PROMPTS, GREEDY)] == expected
        assert eng.stats()["trainer"]["swaps"] >= 3
        assert eng.stats()["trainer"]["error"] is None
    finally:
        eng.close()


def test_no_publish_without_an_optimizer_step():
    """publish_every_s elapsed after units of work that ended no optimizer step: the weights are the
    published ones, so nothing is published (session 27's demo swapped identical weights once);
    the unit that ends the first step publishes."""
    eng = _engine(publish_every_steps=1, publish_every_s=0.0, guard=False, batch_tokens=512, micro_tokens=32,
                  max_passes=1e9, span=32)
    fw = eng.flywheel
    fw.pause()
    try:
        _feed(eng, rounds=2)
        version, units = fw.version, 0
        while fw.trainer.steps == 0 and units < 500:
            assert fw._work()
            units += 1
            if fw.trainer.steps == 0:
                assert fw.version == version                       # a unit without an optimizer step
        assert fw.trainer.steps == 1 and units >= 3 and fw.version == version + 1
    finally:
        eng.close()
