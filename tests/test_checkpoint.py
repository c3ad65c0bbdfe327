"""Resumable learning: a saved flywheel restarts where it stopped (steps, version, optimizer,
draft vocabulary, replay), tau right after the restart equals tau before it on the same
traffic, mismatched or half-written checkpoints are refused, and the CLI persists/exports."""
from __future__ import annotations

import json
import time

import pytest
import torch

from aurora import Engine, EngineConfig, SamplingParams, TrainerConfig
from aurora.flywheel.checkpoint import default_draft_dir, has_checkpoint

GREEDY = SamplingParams(max_tokens=32, temperature=0)
PROMPTS = ["the cat sat on ", "def f(x): return", "hello hello ", "1, 2, 3, 4"]
FAST = TrainerConfig(publish_every_steps=5, publish_every_s=1e9, guard=False, draft_vocab=200,
                     busy_share=1.0)      # steps, not the share of serving, are what these tests wait for


def _engine(trainer=FAST):
    return Engine(EngineConfig(model="tiny-llama", draft="eagle", online=True, dtype="float32", trainer=trainer))


def _freeze(eng):
    """Pause training and wait until no unit of work is in flight and the last publish is served."""
    fw = eng.flywheel
    fw.pause()
    with fw._state_lock:
        pass
    eng.generate_batch(PROMPTS[:1], SamplingParams(max_tokens=2, temperature=0))   # flips a staged slot
    assert eng.proposer.version == fw.version


def _tau(eng):
    outs = eng.generate_batch(PROMPTS, GREEDY)
    return sum(o.stats["accepted_length"] for o in outs) / len(outs), [o.token_ids for o in outs]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A flywheel trained for a while on PROMPTS, frozen, measured and saved."""
    path = tmp_path_factory.mktemp("trained")
    eng = _engine()
    try:
        fw = eng.flywheel
        deadline = time.time() + 300
        while (fw.trainer.steps < 25 or fw.version < 2) and time.time() < deadline:
            eng.generate_batch(PROMPTS, GREEDY)
            assert fw.error is None
        assert fw.version >= 2, fw.stats()
        _freeze(eng)
        tau_before, outs_before = _tau(eng)
        fw.save(path)
        saved = {"steps": fw.trainer.steps, "version": fw.version, "counts": dict(fw.vocab.counts),
                 "d2t": fw.published.d2t.clone(), "replay": len(fw.trainer.replay),
                 "opt": {k: v["exp_avg"].clone() for k, v in fw.trainer.opt.state_dict()["state"].items()}}
    finally:
        eng.close()
    return path, saved, tau_before, outs_before


def test_restart_resumes_learning(trained):
    tmp_path, saved, tau_before, outs_before = trained
    assert has_checkpoint(tmp_path) and (tmp_path / "training.pt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]      # no temp files left

    eng = _engine()
    try:
        fw = eng.flywheel
        fw.pause()
        info = fw.load_state(tmp_path)
        assert info == {"version": saved["version"], "steps": saved["steps"], "training_state": True}
        assert eng.proposer.version == saved["version"] and fw.trainer.steps == saved["steps"]
        assert dict(fw.vocab.counts) == saved["counts"] and torch.equal(fw.published.d2t, saved["d2t"])
        assert torch.equal(eng.proposer.head.d2t.cpu(), saved["d2t"]) and len(fw.trainer.replay) == saved["replay"]
        opt = fw.trainer.opt.state_dict()["state"]
        assert opt.keys() == saved["opt"].keys()
        assert all(torch.equal(opt[k]["exp_avg"].cpu(), v) for k, v in saved["opt"].items())
        tau_after, outs_after = _tau(eng)
        assert tau_after == tau_before and outs_after == outs_before
        assert tau_after > 1.0                                # the draft had learned something
        fw.resume()                                           # learning continues from the saved counters
        deadline = time.time() + 120
        while fw.version <= saved["version"] and time.time() < deadline:
            eng.generate_batch(PROMPTS, GREEDY)
        assert fw.trainer.steps > saved["steps"] and fw.version > saved["version"]
    finally:
        eng.close()


@pytest.mark.parametrize("fmt", ["eagle3", "speculators"])
def test_exported_trained_draft_serves_with_the_same_tau(trained, tmp_path, fmt):
    from aurora.flywheel.export import export_engine_draft
    path, _, _, _ = trained
    results = []
    for src in ("aurora", fmt):
        draft = path if src == "aurora" else tmp_path / fmt
        with Engine(EngineConfig(model="tiny-llama", draft=f"eagle:{draft}", online=False, dtype="float32")) as eng:
            if src == "aurora":
                export_engine_draft(eng, tmp_path / fmt, fmt)
            results.append(_tau(eng))
    (tau_a, outs_a), (tau_b, outs_b) = results
    assert tau_a > 1.0 and tau_b == tau_a and outs_b == outs_a


def test_mismatched_or_torn_checkpoint_is_refused(tmp_path):
    eng = _engine()
    try:
        eng.flywheel.pause()
        eng.flywheel.save(tmp_path)
        torn = tmp_path / "torn"
        eng.flywheel.save(torn)
        cfg = json.loads((torn / "config.json").read_text())
        cfg["snapshot"] = "0" * 32                            # as if config.json came from another save
        (torn / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ValueError, match="different saves"):
            eng.flywheel.load_state(torn)
    finally:
        eng.close()
    other = _engine(TrainerConfig(publish_every_steps=5, guard=False, draft_vocab=100))
    try:
        other.flywheel.pause()
        before = {k: v.clone() for k, v in other.flywheel.published.state_dict().items()}
        with pytest.raises(ValueError, match="does not match this server's draft"):
            other.flywheel.load_state(tmp_path)
        assert all(torch.equal(v, other.flywheel.published.state_dict()[k]) for k, v in before.items())
    finally:
        other.close()


def test_cli_persist_flag_default_dir_and_export(tmp_path, monkeypatch):
    from aurora import cli
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_draft_dir("tiny-llama") == tmp_path / "cache" / "aurora" / "drafts" / "tiny-llama"
    parser = cli.build_parser()
    assert parser.parse_args(["serve"]).persist_draft is True
    assert parser.parse_args(["serve", "--no-persist-draft"]).persist_draft is False
    eng = _engine()
    try:
        eng.flywheel.pause()
        eng.flywheel.save(default_draft_dir("tiny-llama"))
    finally:
        eng.close()
    out = tmp_path / "vllm-draft"
    assert cli.main(["export-draft", str(out), "--model", "tiny-llama", "--format", "speculators"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["speculators_model_type"] == "eagle3" and (out / "model.safetensors").exists()
    assert cli.main(["export-draft", str(tmp_path / "x"), "--model", "tiny-llama",
                     "--draft-dir", str(tmp_path / "none")]) == 2


def test_a_saved_draft_served_online_keeps_its_weights(tmp_path):
    """A saved draft at version 0 (how the corpus day-0 draft is saved) is not a draft from
    scratch: serving it online must not overwrite its LM head and norm with the target's rows
    (`TrainerConfig.init_from_target` is for new heads only; it used to key on version 0)."""
    from aurora.flywheel.checkpoint import save_head
    from aurora.models.eagle import build_head
    with Engine(EngineConfig(model="tiny-llama", draft="none", online=False, dtype="float32")) as eng:
        head = build_head(eng.runner, 200, seed=3)
        layers = list(eng.runner.feature_layers)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.05)
    save_head(head, tmp_path, {"feature_layers": layers, "version": 0})
    saved = {k: v.clone() for k, v in head.state_dict().items()}
    with Engine(EngineConfig(model="tiny-llama", draft=f"eagle:{tmp_path}", online=True, dtype="float32",
                             trainer=TrainerConfig(guard=False, draft_vocab=200))) as eng:
        eng.flywheel.pause()
        for name in ("lm_head.weight", "norm.weight"):
            assert torch.equal(eng.proposer.head.state_dict()[name].cpu(), saved[name]), name
            assert torch.equal(eng.flywheel.trainer.head.state_dict()[name].cpu(), saved[name]), name
        served = eng.proposer.head.lm_head.weight
        target_rows = eng.runner.lm_head.weight[eng.proposer.head.d2t]
        assert not torch.allclose(served, target_rows.to(served))
    with _engine(TrainerConfig(guard=False, draft_vocab=200)) as fresh:   # a new head does start from the target's rows
        head = fresh.proposer.head
        torch.testing.assert_close(head.lm_head.weight, fresh.runner.lm_head.weight[head.d2t].to(head.lm_head.weight))


def test_a_saved_draft_starts_at_the_floor_busy_share_and_earns_up(tmp_path):
    """The trainer's share of busy serving is earned (flywheel.py): a draft from scratch starts at
    busy_share, a saved one at min_busy_share, and a guard verdict that beats it doubles that."""
    from aurora.flywheel.checkpoint import save_head
    from aurora.models.eagle import build_head
    with Engine(EngineConfig(model="tiny-llama", draft="none", online=False, dtype="float32")) as eng:
        head = build_head(eng.runner, 200, seed=3)
        layers = list(eng.runner.feature_layers)
    save_head(head, tmp_path, {"feature_layers": layers, "version": 0})
    trainer = TrainerConfig(draft_vocab=200, busy_share=0.2, min_busy_share=0.04)
    with Engine(EngineConfig(model="tiny-llama", draft=f"eagle:{tmp_path}", online=True, dtype="float32",
                             trainer=trainer)) as eng:
        fw = eng.flywheel
        fw.pause()
        assert fw.budget.share == 0.04 and fw.stats()["busy_share"] == 0.04
        fw._earn(1.1, 1.0)                                        # the candidate beat the active draft
        assert fw.budget.share == 0.08
    with _engine(trainer) as fresh:
        fresh.flywheel.pause()
        assert fresh.flywheel.budget.share == 0.2
