"""aurora/flywheel/pretrain.py (`aurora pretrain-draft`): a distilled corpus record is the trace serving would write for
the same tokens (features and the target's distribution), and its trained head loads as a draft."""
from __future__ import annotations

import itertools

import pytest
import torch

from aurora import Engine, EngineConfig, SamplingParams, TrainerConfig


@pytest.fixture(scope="module")
def pretrain():
    from aurora.flywheel import pretrain as module
    return module


def test_distilled_record_matches_the_served_trace(pretrain):
    eng = Engine(EngineConfig(model="tiny-llama", draft="eagle", online=True, dtype="float32",
                              trainer=TrainerConfig(distil_prompt=False)))
    eng.flywheel.pause()
    try:
        eng.generate_batch(["the cat sat on the mat, the cat"], SamplingParams(max_tokens=24, temperature=0))
        served = eng.flywheel.buffer.drain()[0]
        rec = eng.run_on_worker(pretrain.distil, eng.runner, served.token_ids)
        n = len(served.features)
        assert rec.features.shape == served.features.shape and len(rec.token_ids) == n + 1
        assert torch.allclose(rec.features.float(), served.features.float(), rtol=2e-2, atol=2e-2)
        has = served.has_target
        assert has.sum() > 10 and rec.has_target.all()
        assert torch.equal(rec.target_ids[has, 0], served.target_ids[has, 0])
        assert torch.allclose(rec.target_probs[has].float(), served.target_probs[has].float(), atol=2e-3)
    finally:
        eng.close()


def test_trained_head_loads_as_a_draft(pretrain, tmp_path):
    from aurora.flywheel.checkpoint import save_head
    from aurora.flywheel.trainer import Trainer
    from aurora.models.eagle import build_head
    eng = Engine(EngineConfig(model="tiny-llama", draft="none", online=False, dtype="float32"))
    try:
        ids = list(range(3, 60)) * 2
        recs = [eng.run_on_worker(pretrain.distil, eng.runner, ids)]
        cfg = TrainerConfig(max_passes=1e9, holdout_every=0, batch_tokens=64, micro_tokens=64, lr=3e-3)
        tr = Trainer(build_head(eng.runner, cfg.draft_vocab), eng.runner, cfg)
        tr.add_records(recs)
        w = tr.eval_windows(recs)
        before = tr.evaluate(tr.head, w)
        for _ in range(30):
            tr.optimizer_step()
        assert tr.evaluate(tr.head, w) > before                # it learns the distilled rows
        save_head(tr.head.eval(), tmp_path / "d", {"feature_layers": list(eng.runner.feature_layers)})
    finally:
        eng.close()
    eng = Engine(EngineConfig(model="tiny-llama", draft=f"eagle:{tmp_path / 'd'}+ngram", dtype="float32"))
    try:
        out = eng.generate_batch(["1 2 3"], SamplingParams(max_tokens=8, temperature=0))[0]
        assert len(out.token_ids) == 8
    finally:
        eng.close()


def test_pretrain_draft_command_saves_a_draft_and_keeps_an_existing_one(tmp_path, capsys):
    """`aurora pretrain-draft` end to end on the tiny model: real ShareGPT conversations, held-out
    τ scored, a loadable checkpoint saved; a second run into the same directory is refused; a
    replies stage trains on from it."""
    from aurora.cli import main
    from aurora.flywheel.checkpoint import has_checkpoint, load_head
    out = tmp_path / "day0"
    argv = ["pretrain-draft", "--model", "tiny-llama", "--convs", "22", "--max-len", "64", "--steps", "4",
            "--evals", "1", "--out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert has_checkpoint(out) and '"tau_held"' in text and "saved the day-0 draft" in text
    head, meta = load_head(out)
    assert meta["trainer_steps"] == 4 and meta["pretrain"]["convs"] == 22
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and "already holds a draft" in capsys.readouterr().err

    # `--init DIR --replies N`: the head starts from DIR's weights (at a vanishing learning rate it
    # ends where it began, where a fresh head would not), the target's own replies are distilled
    # and scored held out, and the saved meta records both stages' steps.
    replies = tmp_path / "replies"
    assert main(["pretrain-draft", "--model", "tiny-llama", "--convs", "22", "--max-len", "200", "--steps", "1",
                 "--evals", "1", "--lr", "1e-12", "--replies", "24", "--reply-tokens", "16", "--init", str(out),
                 "--out", str(replies)]) == 0
    assert '"tau_held_replies"' in capsys.readouterr().out
    b, meta = load_head(replies)
    assert all(torch.allclose(x.float(), y.float(), atol=1e-2) for x, y in zip(head.state_dict().values(),
                                                                            b.state_dict().values()))
    assert meta["trainer_steps"] == 5 and meta["pretrain"]["replies"] == 24
    assert meta["pretrain"]["init"]["pretrain"]["steps"] == 4 and "target replies" in meta["source"]


def test_default_day0_dir_sits_next_to_the_persisted_draft(monkeypatch, tmp_path):
    from aurora.flywheel.checkpoint import default_draft_dir
    from aurora.flywheel.pretrain import default_day0_dir
    monkeypatch.setenv("AURORA_CACHE_DIR", str(tmp_path))
    assert default_day0_dir("smollm2-135m") == tmp_path / "drafts" / "smollm2-135m-day0"
    assert default_day0_dir("smollm2-135m").parent == default_draft_dir("smollm2-135m").parent


def test_cosine_schedule_runs_from_lr_to_a_tenth():
    """`--schedule cosine` (the default): lr at the first step, LR_FLOOR * lr at the last, halfway
    between at the middle, never rising; `constant` keeps lr."""
    from aurora.flywheel.pretrain import LR_FLOOR, lr_at
    rates = [lr_at(s, 100, 1e-3, "cosine") for s in range(101)]
    assert rates[0] == pytest.approx(1e-3) and rates[-1] == pytest.approx(LR_FLOOR * 1e-3)
    assert rates[50] == pytest.approx((1 + LR_FLOOR) / 2 * 1e-3)
    assert all(a >= b for a, b in itertools.pairwise(rates))
    assert {lr_at(s, 100, 1e-3, "constant") for s in (0, 50, 100)} == {1e-3}


def test_demo_names_a_day0_draft_from_an_older_recipe(tmp_path):
    """A corpus draft with fewer conversations than the default, or saved before the recipe was
    recorded, gets a rebuild hint, one without the target-replies stage a hint to add it (the
    command `make draft` runs); a current one, and a draft that is not a corpus draft, do not."""
    import json

    from aurora.flywheel.pretrain import DEFAULT_CONVS, REPLIES_STAGE, older_recipe_note

    def saved(meta):
        d = tmp_path / str(len(list(tmp_path.iterdir())))
        d.mkdir()
        (d / "config.json").write_text(json.dumps(meta))
        return d
    src = "aurora pretrain-draft (ShareGPT)"
    old = older_recipe_note(saved({"source": src, "pretrain": {"convs": 400}}))
    assert old and "from 400 conversations" in old and f"distils {DEFAULT_CONVS} conversations" in old and "--force" in old
    assert "older recipe" in older_recipe_note(saved({"source": "corpus_pretrain (ShareGPT)"}))
    stage1 = older_recipe_note(saved({"source": src, "pretrain": {"convs": DEFAULT_CONVS}}))
    assert "target's own replies" in stage1 and REPLIES_STAGE in stage1 and "--init" in stage1
    current = {"convs": 420, "replies": 800, "init": {"pretrain": {"convs": DEFAULT_CONVS}}}
    assert older_recipe_note(saved({"source": src + " + target replies", "pretrain": current})) is None
    assert older_recipe_note(saved({"version": 3})) is None
    assert older_recipe_note(tmp_path / "missing") is None


def test_reply_prompts_skip_bench_prompts_and_cover_every_domain(pretrain):
    """`--replies` draws its prompts from the bench domains but never a bench/demo prompt."""
    from aurora.workloads.corpora import SHAREGPT_DOMAINS, load_domain
    bench = {p.text[:200] for p in load_domain("chat", 100, seed=0)}
    prompts = pretrain.reply_prompts(40, bench)
    assert len(prompts) == 40 and not {p.text[:200] for p in prompts} & bench
    assert {p.domain for p in prompts} >= set(SHAREGPT_DOMAINS) - {"code"}


def test_reply_domains_pick_where_the_reply_prompts_come_from(pretrain, capsys):
    """`--reply-domains code` draws every reply prompt from code, two domains alternate, and a
    domain the corpora do not have is refused before any work."""
    assert {p.domain for p in pretrain.reply_prompts(12, set(), domains=("code",))} == {"code"}
    both = pretrain.reply_prompts(12, set(), domains=("code", "finance"))
    assert [p.domain for p in both] == ["code", "finance"] * 6
    with pytest.raises(SystemExit):
        pretrain.main(["--reply-domains", "cod", "--no-save"])
    assert "--reply-domains must name some of code, finance, math, chat, got 'cod'" in capsys.readouterr().err


def test_target_replies_are_the_prompt_then_the_greedy_continuation(pretrain):
    """A replies record is the prompt (raw text cut to `max_len - tokens` tokens) followed by
    exactly what plain greedy serving generates for it."""
    eng = Engine(EngineConfig(model="tiny-llama", draft="none", online=False, dtype="float32"))
    try:
        prompts = pretrain.reply_prompts(4, set())
        ids = pretrain.target_replies(eng, prompts, 8, 200, 4)
        raw = list(eng.tokenizer.encode(prompts[0].text, add_special_tokens=False))[:192]
        assert len(ids) == 4 and ids[0][:len(raw)] == raw
        plain = eng.generate_batch([raw], SamplingParams(max_tokens=8, temperature=0))[0]
        assert ids[0][len(raw):] == list(plain.token_ids)
    finally:
        eng.close()


def test_make_draft_runs_the_replies_stage_the_hint_names():
    """`make draft`'s stage 2 is the command `older_recipe_note` tells an older draft's owner to run."""
    import re
    from pathlib import Path

    from aurora.flywheel.pretrain import REPLIES_STAGE
    make = (Path(__file__).parents[1] / "Makefile").read_text()
    assert re.search(r"^DAY0_REPLIES\s*:=\s*(.*)$", make, re.MULTILINE).group(1).strip() == REPLIES_STAGE
    assert "$(DAY0_REPLIES) --init $(DAY0_BASE)" in make
