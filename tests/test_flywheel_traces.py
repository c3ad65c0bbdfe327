"""Flywheel traces and training data: stored target distribution, bf16 features, windows for
long requests, no leaked collector state, packed windows that never see each other, a discard
gradient that does not vanish, trainer passes, and serving/trainer CPU turns."""
from __future__ import annotations

import math
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from aurora import Engine, EngineConfig, SamplingParams, TrainerConfig
from aurora.engine.step import SeqRows
from aurora.flywheel import losses
from aurora.flywheel.packing import pack, visibility
from aurora.flywheel.share import ShareBudget
from aurora.flywheel.traces import (
    RingBuffer,
    TraceCollector,
    TraceRecord,
    with_prompt_labels,
)

GREEDY = SamplingParams(max_tokens=40, temperature=0)
PROMPTS = ["the cat sat on ", "def f(x): return", "hello hello ", "1, 2, 3, 4"]


def _paused_engine(**trainer):
    eng = Engine(EngineConfig(model="tiny-llama", draft="eagle", online=True, dtype="float32",
                              trainer=TrainerConfig(**trainer)))
    eng.flywheel.pause()
    return eng


def _records(eng, prompts=PROMPTS, params=GREEDY):
    eng.generate_batch(prompts, params)
    return eng.flywheel.buffer.drain()


def test_trace_keeps_target_distribution_from_verification():
    """Greedy: the stored target top-1 at every generated position is the next committed token,
    probabilities are sorted and sum to <= 1; prompt positions (no logits kept) are marked."""
    eng = _paused_engine()
    try:
        recs = _records(eng)
        assert len(recs) == len(PROMPTS)
        for rec, prompt in zip(recs, PROMPTS):
            has = rec.has_target
            n_prompt = len(prompt.encode())
            assert not has[:n_prompt - 1].any() and has[n_prompt - 1:].all()
            top1 = rec.target_ids[:, 0].tolist()
            for i in has.nonzero()[:, 0].tolist():
                assert top1[i] == rec.token_ids[i + 1]
            p = rec.target_probs[has].float()
            assert (p[:, :-1] >= p[:, 1:]).all() and (p.sum(-1) <= 1.001).all()
            assert rec.features.dtype == torch.bfloat16
            assert rec.prompt_hidden.shape == (n_prompt - 1, eng.runner.hidden_size)   # for distillation
    finally:
        eng.close()


def _fake_view(seq, feats, logits, rows, trees=None, outcomes=None):
    res = SimpleNamespace(features=feats, logits=logits, hidden=torch.randn(len(feats), 4))
    return SimpleNamespace(seqs=[seq], trees=trees or [None], rows=rows, outcomes=outcomes or [([], 0)],
                           result=res, draft_version=0)


def test_features_stored_in_bf16_keep_large_values():
    """A hidden-state outlier of 1e5 (fp16 max is 65504) survives the trace."""
    buf = RingBuffer(1 << 20)
    col = TraceCollector(buf)
    seq = SimpleNamespace(request_id="r", num_cached=0, num_prefix_cached=0, finished=False, token_ids=[1, 2, 3, 4])
    feats = torch.full((3, 6), 1e5)
    view = _fake_view(seq, feats, torch.randn(1, 10), [SeqRows(0, 3, 0, 0)])
    col.on_step(view)
    seq.num_cached = 3
    col.on_finish(seq)
    rec = buf.drain()[0]
    assert torch.isfinite(rec.features.float()).all()
    assert torch.allclose(rec.features.float(), feats[:3], rtol=1e-2)


def test_long_request_keeps_a_bounded_window():
    """More positions than the collector's cap: a trace of the last `cap` positions, aligned."""
    eng = _paused_engine()
    try:
        eng.flywheel.collector.max_positions = 24
        out = eng.generate_batch(["a b c d e f g h "], SamplingParams(max_tokens=60, temperature=0))[0]
        recs = eng.flywheel.buffer.drain()
        assert len(recs) == 1
        rec = recs[0]
        full = out.prompt_token_ids + out.token_ids
        assert len(rec.features) <= 24 and rec.start > 0
        assert rec.token_ids == full[rec.start:rec.start + len(rec.features) + 1]
        for i in rec.has_target.nonzero()[:, 0].tolist():
            assert rec.target_ids[i, 0] == rec.token_ids[i + 1]
        assert eng.flywheel.collector.open_requests() == 0
    finally:
        eng.close()


def test_no_collector_state_survives_an_errored_request(monkeypatch):
    eng = _paused_engine()
    try:
        import aurora.engine.engine as engine_mod

        def boom(tree, argmax):
            raise RuntimeError("injected")
        monkeypatch.setattr(engine_mod, "verify_greedy", boom)
        outs = eng.generate_batch(PROMPTS, GREEDY)
        assert all(o.finish_reason == "error" for o in outs)
        assert eng.flywheel.collector.open_requests() == 0
    finally:
        eng.close()


def _rec(n, seed, hidden=8, k=4):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (n, k), generator=g, dtype=torch.int32)
    ids[: n // 3] = -1                                   # a prompt part without targets
    probs = torch.rand(n, k, generator=g).half() * (ids >= 0)
    return TraceRecord("r", torch.randint(0, 50, (n + 1,), generator=g).tolist(),
                       torch.randn(n, 3 * hidden, generator=g).bfloat16(), ids, probs,
                       [(1, n // 2, 7)], torch.randint(0, 50, (1, k), generator=g, dtype=torch.int32),
                       torch.rand(1, k, generator=g).half())


def test_packed_windows_never_see_each_other():
    from aurora.models.eagle import EagleHead
    torch.manual_seed(0)
    head = EagleHead(8, 2, 4, 16, 50).float()
    runner = SimpleNamespace(embed_tokens=torch.nn.Embedding(50, 8), device=torch.device("cpu"), vocab_size=50)
    from aurora.flywheel.trainer import Trainer
    tr = Trainer(head, runner, TrainerConfig(unroll=3))
    a, b = _rec(30, 1), _rec(20, 2)
    both = pack([(a, 0, 30), (b, 0, 20)], 3)
    alone = pack([(a, 0, 30)], 3)
    h_both, h_alone = tr._forward(tr.head, both), tr._forward(tr.head, alone)
    rows_a = [k for k, s in enumerate(s for lv in both.levels for s in lv.seg) if s == 0]
    assert len(rows_a) == h_alone.shape[0]
    assert torch.allclose(h_both[rows_a], h_alone, atol=1e-5)
    vis = visibility(both.levels, 1, "cpu")
    assert vis.shape[0] == len(both.levels[1].pos)
    assert any(not c for lv in both.levels for c in lv.chain)          # the rejected node was packed


def test_trainer_never_calls_the_target_lm_head():
    """Where verification kept the target's distribution, training never recomputes it (prompt
    distillation, the one use of the LM head, is off here; see the test below)."""
    eng = _paused_engine(publish_every_steps=10**6, guard=False, distil_prompt=False)
    try:
        fw = eng.flywheel
        fw.trainer.add_records(_records(eng))

        class NoHead:
            def __getattr__(self, name):
                if name in ("lm_head", "logits_from_hidden"):
                    raise AssertionError("the trainer recomputed the target LM head")
                return getattr(eng.runner, name)
        fw.trainer.runner = NoHead()
        assert fw.trainer.train_step()
        assert fw.trainer.tokens_trained > 0 and fw.trainer.last_losses["imitation"] > 0
    finally:
        eng.close()


def _target_probs(eng, token_ids):
    """Reference: the target's next-token distribution at every position of `token_ids`, from
    transformers' own attention over the whole sequence (no paged cache, no trace)."""
    from aurora.models.runner import ATTN_NAME, set_attn
    model = eng.runner.model
    set_attn(model, "sdpa")
    try:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([token_ids]), use_cache=False).logits[0].float()
    finally:
        set_attn(model, ATTN_NAME)
    return torch.softmax(logits, -1)


def test_prompt_distillation_labels_prompt_rows_with_the_target_distribution():
    """Prompt positions arrive without a target; units of at most `micro_tokens` rows label them
    with the target's top-k, equal to the reference forward; the LM head runs on those rows only."""
    eng = _paused_engine(publish_every_steps=10**6, guard=False, micro_tokens=4, holdout_every=0)
    try:
        long_prompts = [p * 3 for p in PROMPTS]
        recs = _records(eng, long_prompts, SamplingParams(max_tokens=8, temperature=0))
        tr = eng.flywheel.trainer
        before = {id(r): (~r.has_target).nonzero()[:, 0] for r in recs}
        assert all(len(b) > 4 for b in before.values())
        rows_seen = []
        real = eng.runner.logits_from_hidden

        def counting(h):
            rows_seen.append(h.shape[0])
            return real(h)
        eng.runner.logits_from_hidden = counting
        tr.add_records(recs)
        replay_rows = tr.replay_rows()
        assert tr.has_work() and tr.train_step() and tr.steps == 0          # a distillation unit
        assert rows_seen == [4]
        while tr._undistilled:
            tr.train_step()
        assert sum(rows_seen) == sum(len(b) for b in before.values()) == tr.rows_distilled
        assert max(rows_seen) <= 4
        assert tr.replay_rows() == replay_rows + tr.rows_distilled
        assert eng.stats()["trainer"]["prompt_rows_distilled"] == tr.rows_distilled
        for rec in recs:
            assert rec.prompt_hidden is None and rec.has_target.all()
            ref = _target_probs(eng, rec.token_ids)                          # [n + 1, V]
            for i in before[id(rec)].tolist():                                # the hidden is kept in
                ids, probs = rec.target_ids[i].long(), rec.target_probs[i].float()   # bf16: near-ties may swap
                assert torch.allclose(probs, ref[i, ids], atol=3e-3)
                assert probs[0] >= ref[i].max() - 3e-3
                assert torch.allclose(probs, ref[i].topk(len(ids)).values, atol=3e-3)
        assert tr.train_step() and tr.tokens_trained > 0                    # then training proper
    finally:
        eng.close()


def test_prompt_distillation_skips_records_evicted_before_their_turn():
    """A record that left the replay before its prompt rows were labelled is not labelled (its
    hidden states are dropped); the replay's row count stays exact."""
    eng = _paused_engine(publish_every_steps=10**6, guard=False, replay_records=2, holdout_every=0)
    try:
        tr = eng.flywheel.trainer
        recs = _records(eng)
        assert len(recs) >= 3 and all(r.prompt_hidden is not None for r in recs)
        prompt_rows = {id(r): int((~r.has_target).sum()) for r in recs}
        tr.add_records(recs)                                    # only the last two stay in the replay
        evicted, kept = recs[:-2], recs[-2:]
        while tr.distil_pending():
            pass
        assert all(r.prompt_hidden is None for r in recs)
        assert tr.rows_distilled == sum(prompt_rows[id(r)] for r in kept) > 0
        assert all(not r.has_target.all() for r in evicted)     # never labelled
        assert all(r.has_target.all() for r in kept)
        assert tr.replay_rows() == sum(int(r.has_target.sum()) for r in kept)
    finally:
        eng.close()


def test_prompt_distillation_off_keeps_prompt_rows_as_context():
    eng = _paused_engine(publish_every_steps=10**6, guard=False, distil_prompt=False)
    try:
        recs = _records(eng)
        assert all(r.prompt_hidden is None and not r.has_target.all() for r in recs)
        tr = eng.flywheel.trainer
        tr.add_records(recs)
        assert not tr._undistilled and tr.rows_distilled == 0
    finally:
        eng.close()


@pytest.mark.parametrize("weights", [{}, {"w_discard": 0.5, "w_counterfactual": 0.5}])
def test_rejected_proposal_terms_run_only_when_weighted(weights):
    """Defaults are imitation only (the 1,000-step A/B); the discard hinge and the
    counterfactual KL at rejected nodes still train when given a weight."""
    eng = _paused_engine(publish_every_steps=10**6, guard=False, **weights)
    try:
        tr = eng.flywheel.trainer
        tr.add_records(_records(eng))
        seen: set = set()
        steps = 0
        while steps < 20 and tr.train_step():
            steps += 1
            seen |= set(tr.last_losses)
        assert steps >= 1
        assert {"discard", "counterfactual"} <= seen if weights else not seen & {"discard", "counterfactual"}
        assert all(math.isfinite(v) for v in tr.last_losses.values())
    finally:
        eng.close()


def test_several_windows_per_step_and_bounded_passes():
    eng = _paused_engine(publish_every_steps=10**6, guard=False, batch_tokens=256, span=16, max_passes=2)
    try:
        tr = eng.flywheel.trainer
        tr.add_records(_records(eng))
        assert len(tr.sample_windows()) > 1
        steps = 0
        while tr.train_step():
            steps += 1
            assert steps < 500
        assert tr.passes >= 2 and not tr.has_work()
        tr.add_records(_records(eng, PROMPTS[:2]))               # new traffic wakes it
        assert tr.train_step()
    finally:
        eng.close()


def test_micro_batches_bound_the_unit_of_work():
    """An optimizer step is split into micro-batches (each one turn of the trainer, so serving waits
    at most one): weights change only after the last micro-batch of a step."""
    eng = _paused_engine(publish_every_steps=10**6, guard=False, batch_tokens=512, micro_tokens=48, span=16,
                         max_passes=1e9)
    try:
        tr = eng.flywheel.trainer
        tr.add_records(_records(eng))
        groups = tr.sample_micro_batches()
        assert len(groups) > 1
        for group in groups:
            est = [tr._window_rows(rec, a, b, int(rec.has_target[a:b].sum())) for rec, a, b in group]
            assert len(group) == 1 or sum(est) <= 48
        before = {k: v.clone() for k, v in tr.head.state_dict().items()}
        units = 0
        while tr.steps == 0:
            assert tr.train_step()
            units += 1
            if tr.steps == 0:
                assert all(torch.equal(before[k], v) for k, v in tr.head.state_dict().items())
        assert units > 1
        assert any(not torch.equal(before[k], v) for k, v in tr.head.state_dict().items())
        assert tr.optimizer_step() and tr.steps == 2
        # each micro-batch is two units, forward then backward: a request waits for half of one
        assert tr.train_step() and tr.mid_micro_batch
        assert all(p.grad is None for p in tr.head.parameters())
        assert tr.train_step() and not tr.mid_micro_batch
        assert any(p.grad is not None for p in tr.head.parameters())
        assert tr.train_step() and tr.mid_micro_batch
        with torch.no_grad():                       # weights replaced between the halves (a rollback):
            tr.head.fc.weight.add_(1.0)             # the stale graph is dropped, training goes on
        tr.reset_optimizer()
        assert not tr.mid_micro_batch and tr.optimizer_step() and tr.steps == 3
    finally:
        eng.close()


def test_prompt_labels_add_hard_rows_and_keep_real_targets():
    eng = _paused_engine(publish_every_steps=10**6, guard=False, w_prompt=0.5, span=16, batch_tokens=256,
                         distil_prompt=False)         # hard labels stand in where distillation is off
    try:
        rec = _records(eng)[1]
        lab = with_prompt_labels(rec)
        had = rec.has_target
        assert lab.has_target[:len(rec.token_ids) - 1].all()            # every position with a next token
        assert torch.equal(lab.label_only, ~had & (torch.arange(len(had)) < len(rec.token_ids) - 1))
        assert torch.equal(lab.target_ids[had], rec.target_ids[had])      # real targets untouched
        i = int(lab.label_only.nonzero()[0, 0])
        assert int(lab.target_ids[i, 0]) == rec.token_ids[i + 1] and float(lab.target_probs[i, 0]) == 1.0
        packed = pack([(lab, 0, len(lab.features))], 2)
        assert packed.target_hard.any() and not packed.target_hard.all()
        tr = eng.flywheel.trainer
        tr.add_records([rec])
        assert tr.replay[0].label_only is not None and tr.optimizer_step()
    finally:
        eng.close()


def test_log_space_discard_gradient_does_not_vanish():
    logits = torch.tensor([[-4.6, 0.0, 0.0]], requires_grad=True)       # q(x=0) ~ 0.005
    p = torch.tensor([[0.0, 0.5, 0.5]])
    tok = torch.tensor([0])
    losses.discard(torch.log_softmax(logits, -1), p, tok).sum().backward()
    g_log = logits.grad[0, 0].item()
    logits.grad = None
    losses.hinge(torch.softmax(logits, -1), p, tok).sum().backward()
    g_hinge = logits.grad[0, 0].item()
    assert g_log > 0.9 and g_hinge < 0.01


def test_discard_is_zero_where_target_wants_more():
    logq = torch.log(torch.tensor([[0.2, 0.8]]))
    p = torch.tensor([[0.5, 0.5]])
    assert losses.discard(logq, p, torch.tensor([0])).item() == 0.0


def test_share_budget_spends_idle_time_first():
    """Training done while idle counts against the busy share: with >= 15% of the recent window
    already trained, the trainer takes no turn from busy serving until the window moves on."""
    now = [100.0]
    b = ShareBudget(0.15, window_s=10.0, clock=lambda: now[0])
    now[0] += 10.0
    assert b.allows() and b.fraction() == 0
    b.record(2.0)                             # 2 s of idle training in the last 10 s: 20%
    assert not b.allows() and abs(b.fraction() - 0.2) < 1e-9
    now[0] += 5.0
    assert not b.allows()
    now[0] += 6.0                             # the unit left the window
    assert b.allows() and b.fraction() == 0


def test_share_budget_clock_stops_while_paused():
    """Paused wall time (another system serving, in a benchmark) is no credit: the trainer's
    compute before the pause still fills the window right after it."""
    now = [0.0]
    b = ShareBudget(0.1, window_s=10.0, clock=lambda: now[0])
    now[0] += 10.0
    b.record(1.5)                             # 15 % of the last 10 s
    assert not b.allows()
    b.pause()
    now[0] += 100.0                           # long pause: without the stop, the unit left the window
    b.resume()
    assert b.fraction() == pytest.approx(0.15) and not b.allows()
    now[0] += 6.0                             # 6 s of running later: still inside the window
    assert b.fraction() == pytest.approx(0.15)
    now[0] += 5.0                             # the unit left the (running-time) window
    assert b.fraction() == 0 and b.allows()


def test_share_budget_counts_idle_time_offered_even_if_unused():
    """A trainer that slept through idle time (nothing to do) was offered its share: no turns
    from busy serving; under sustained load (little idle time) it takes them."""
    now = [0.0]
    b = ShareBudget(0.15, window_s=10.0, clock=lambda: now[0])
    now[0] += 10.0
    b.offered(4.0)                            # 40 % idle, the trainer trained 0 s of it
    assert b.fraction() == 0 and not b.allows()
    now[0] += 11.0                            # that idle time left the window: sustained load
    b.offered(0.5)
    assert b.idle_fraction() == pytest.approx(0.05) and b.allows()


def test_trainer_takes_no_busy_turns_when_idle_time_gave_its_share():
    eng = Engine(EngineConfig(model="tiny-llama", draft="eagle", online=True, dtype="float32",
                              trainer=TrainerConfig(span=16, batch_tokens=128, guard=False)))
    try:
        fw = eng.flywheel
        fw.budget.record(1e6)                     # as if idle time had just trained a lot
        busy_units = []
        real = fw.trainer.train_step

        def step():
            busy_units.append(fw._serving_busy())
            return real()
        fw.trainer.train_step = step
        eng.generate_batch(PROMPTS * 2, SamplingParams(max_tokens=60, temperature=0, ignore_eos=True))
        assert fw.yielded_turns > 0
        assert sum(busy_units) <= 1               # at most a unit that began just before a request
    finally:
        eng.close()


def test_a_back_to_back_gap_is_not_idle_time():
    """Right after a request finishes, serving still counts as busy for `idle_grace_s`: a trainer
    unit started in the gap before a client's next request would make that request wait it out.
    Idle longer than that, the trainer may take the whole machine."""
    eng = Engine(EngineConfig(model="tiny-llama", draft="eagle", online=True, dtype="float32",
                              trainer=TrainerConfig(idle_grace_s=1.0)))
    try:
        fw = eng.flywheel
        fw.pause()
        eng.generate(PROMPTS[0], SamplingParams(max_tokens=8, temperature=0))
        assert not eng.machine_busy() and eng.machine_idle_s() < 1.0
        assert fw._serving_busy()                 # in the gap: still busy for the trainer
        time.sleep(1.2)
        assert eng.machine_idle_s() >= 1.0 and not fw._serving_busy()
        frozen = fw.budget._now()                 # the share budget's clock stops while paused
        time.sleep(0.2)
        assert fw.budget._now() == frozen
        fw.resume()
        time.sleep(0.05)
        assert fw.budget._now() > frozen
    finally:
        eng.close()
    from aurora.flywheel.flywheel import Flywheel
    serving = SimpleNamespace(machine_busy=lambda: True, machine_idle_s=lambda: 0.0)
    no_grace = SimpleNamespace(on_worker=True, engine=serving, config=TrainerConfig(idle_grace_s=0))
    assert Flywheel._serving_busy(no_grace)       # grace 0: busy exactly while serving has work


def test_serving_keeps_every_core(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    eng = Engine(EngineConfig(model="tiny-llama", draft="eagle", online=True, dtype="float32"))
    try:
        assert eng.serve_threads() == 4
    finally:
        eng.close()


def test_cpu_trainer_works_on_the_engine_thread():
    """Every unit of CPU training runs on the engine's worker thread (one OpenMP pool in the
    process), never on the trainer thread, and never inside a serving step."""
    eng = Engine(EngineConfig(model="tiny-llama", draft="eagle", online=True, dtype="float32",
                              trainer=TrainerConfig(span=16, batch_tokens=128, guard=False)))
    try:
        fw, threads, in_step = eng.flywheel, set(), []
        real_train, real_step = fw.trainer.train_step, eng.step
        stepping = [False]

        def train_step():
            threads.add(threading.current_thread().name)
            in_step.append(stepping[0])
            return real_train()

        def step():
            stepping[0] = True
            try:
                real_step()
            finally:
                stepping[0] = False
        fw.trainer.train_step, eng.step = train_step, step
        eng.generate_batch(PROMPTS * 2, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
        end = time.time() + 60
        while time.time() < end and fw.trainer.steps == 0:
            time.sleep(0.05)
        assert fw.trainer.steps > 0 and threads == {"aurora-engine"} and not any(in_step)
    finally:
        eng.close()


def test_idle_trainer_sleeps_after_bounded_passes():
    eng = Engine(EngineConfig(model="tiny-llama", draft="eagle", online=True, dtype="float32",
                              trainer=TrainerConfig(max_passes=1, span=16, batch_tokens=128, guard=False)))
    try:
        eng.generate_batch(PROMPTS, GREEDY)
        fw = eng.flywheel
        end = time.time() + 60
        while time.time() < end and not (fw.sleeping and fw.trainer.steps > 0):
            time.sleep(0.05)
        steps = fw.trainer.steps
        assert fw.sleeping and steps > 0
        time.sleep(0.5)
        assert fw.trainer.steps == steps                        # asleep: no more steps without traffic
    finally:
        eng.close()


@pytest.mark.parametrize("bad", [dict(busy_share=0), dict(discard="x"), dict(max_passes=0), dict(top_k=0)])
def test_trainer_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        TrainerConfig(**bad)
