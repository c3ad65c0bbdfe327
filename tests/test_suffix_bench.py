"""Bench plumbing for the memory workloads: the suffix systems are registered, and a multi-turn
request is encoded per system with the replies that system produced for the earlier turns."""
from __future__ import annotations

import pytest

from aurora.bench.run import SUFFIX_SYSTEMS, BenchConfig, _Bench, encode
from aurora.bench.systems import SYSTEMS, Output
from aurora.workloads import fill_history, multiturn


def test_suffix_systems_registered():
    for name in ("suffix", "suffix+ngram", "eagle+suffix", "eagle+suffix+ngram", "eagle+suffix+ngram-ckpt"):
        assert name in SYSTEMS and "suffix" in SYSTEMS[name].draft
    assert set(SUFFIX_SYSTEMS) <= set(SYSTEMS)
    BenchConfig(systems=SUFFIX_SYSTEMS, domains=("multiturn", "templated", "related-code"))


def test_multiturn_prompt_carries_this_systems_replies():
    from aurora.bench.systems import load_tokenizer
    try:
        tok = load_tokenizer("smollm2-135m")
    except Exception as exc:  # noqa: BLE001 -- the converted default model is not on this machine
        pytest.skip(f"smollm2 tokenizer unavailable: {exc}")
    prompts = multiturn(3, seed=0)
    assert [p.turn for p in prompts] == [0, 1, 2]
    bench = object.__new__(_Bench)
    bench.tokenizer, bench.prompts = tok, prompts
    bench.cfg, bench.order = BenchConfig(), ["a", "b"]
    bench.prompt_ids = [encode(tok, p) for p in prompts]
    bench.runs = {"a": {"outputs": [], "wall_s": 0.0}, "b": {"outputs": [], "wall_s": 0.0}}
    for name, reply in (("a", "Alpha reply."), ("b", "Beta reply.")):
        bench.runs[name]["system"] = type("S", (), {"generate": lambda self, ids, params, r=reply:
                                                   Output(tok.encode(r, add_special_tokens=False), 1.0, 1.0)})()
        bench.serve = _Bench.serve.__get__(bench)
    bench.params, bench.bar = None, type("B", (), {"set_description": print, "set_postfix_str": print,
                                                   "update": lambda self, n: None})()
    bench.serve("a", 0)
    bench.serve("b", 0)
    ids_a, ids_b = bench.prompt_for("a", 1), bench.prompt_for("b", 1)
    assert "Alpha reply." in tok.decode(ids_a) and "Beta reply." in tok.decode(ids_b)
    want = encode(tok, type(prompts[1])(**{**prompts[1].__dict__,
                                          "messages": fill_history(prompts[1], {(prompts[1].conversation, 0):
                                                                                "Alpha reply."})}))
    assert ids_a == want and bench.runs["a"]["prompt_lens"] == {0: len(bench.prompt_ids[0])}
    bench.cfg, bench.order = BenchConfig(shared_history=True), ["a", "b"]   # every system: a's replies
    assert bench.prompt_for("b", 1) == want and bench.prompt_for("a", 1) == want


@pytest.mark.parametrize("name,adaptive,ngram_depth,online,w_discard", [
    ("suffix+ngram-adaptive", True, 0, False, 0.0), ("ngram-d10", False, 10, False, 0.0),
    ("online", False, 0, True, 0.0), ("online-discard", False, 0, True, 0.5)])
def test_bench_variants_reach_the_engine_config(name, adaptive, ngram_depth, online, w_discard):
    from aurora.bench.systems import BuildOptions, build_system
    system = build_system(name, BuildOptions(model="tiny-llama", dtype="float32"))
    try:
        cfg = system.engine.config
        assert (cfg.spec.adaptive, cfg.spec.ngram_depth, cfg.online, cfg.trainer.w_discard) == \
            (adaptive, ngram_depth, online, w_discard)
    finally:
        system.close()
