"""The hand-written Llama step (aurora/models/fast_llama.py) against transformers' forward, the
reference: in fp32 every step's logits, hidden states and draft features are the same bits
(prompts, draft trees, mixed batches; Llama, Qwen2 with biases and Qwen3 with QK-norm, both with
sliding-window layers); which models take it; the fused packed GEMMs of the bf16
path equal the separate calls; and the engine knob."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aurora import Engine, EngineConfig, SamplingParams, SpecConfig
from aurora.models.fast_llama import supports
from aurora.models.packed_linear import PLAIN_FROM_ROWS, FusedPacked, PackedLinear, packing_supported
from aurora.models.presets import build

PROMPTS = ["def add(a, b):\n    return a + b\n\ndef add(a, b):", "hello hello hello world", "the cat sat"]


def _both_paths(runner, calls):
    """Runner.forward computing the fast step and the reference step, asserting they agree."""
    fast_forward = runner.forward

    def forward(batch):
        fast = fast_forward(batch)
        saved, runner.fast = runner.fast, None
        try:
            ref = fast_forward(batch)             # writes the same K/V into the same slots again
        finally:
            runner.fast = saved
        assert torch.equal(fast.logits, ref.logits)
        assert torch.equal(fast.hidden, ref.hidden)
        assert torch.equal(fast.features, ref.features)
        calls.append(batch.input_ids.shape[0])
        return fast
    return forward


@pytest.mark.parametrize("model,draft", [("tiny-llama", "none"), ("tiny-llama", "ngram"),
                                         ("tiny-llama", "eagle+ngram"), ("tiny-qwen2", "eagle+ngram"),
                                         ("tiny-qwen3", "eagle+ngram")])
def test_every_step_equals_the_transformers_forward_in_fp32(model, draft):
    calls: list[int] = []
    spec = SpecConfig(adaptive=False)
    with Engine(EngineConfig(model=model, draft=draft, online=False, dtype="float32", spec=spec,
                             prefill_chunk=8)) as eng:
        assert eng.runner.fast is not None
        eng.runner.forward = _both_paths(eng.runner, calls)
        eng.step_hooks.append(lambda view: None)      # full steps: every row's hidden state (no tail)
        # ignore_eos: the sampled tokens depend on the draft's proposals, and a from-scratch eagle head
        # is drawn from the global RNG, which earlier tests in the process have advanced
        greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
        sampled = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=3, ignore_eos=True)
        outs = eng.generate_batch(PROMPTS, [greedy, sampled, greedy])
    assert all(len(o.token_ids) == 12 for o in outs), [(len(o.token_ids), o.finish_reason, o.error) for o in outs]
    if model != "tiny-llama":                                     # past the 24-token sliding window
        assert max(len(eng.encode_prompt(p)) for p in PROMPTS) + 12 > 24
    assert max(calls) > 3 and len(calls) > 5                      # prompts, decode and tree steps ran


def test_greedy_tokens_equal_with_the_fast_path_on_and_off():
    greedy = SamplingParams(max_tokens=16, temperature=0)
    outs = {}
    for on in (True, False):
        with Engine(EngineConfig(model="tiny-llama", draft="ngram", online=False, dtype="float32",
                                 fast_path=on)) as eng:
            assert (eng.runner.fast is not None) == on
            outs[on] = [o.token_ids for o in eng.generate_batch(PROMPTS, greedy)]
    assert outs[True] == outs[False]


def test_which_models_take_it():
    for name in ("tiny-llama", "tiny-qwen2", "tiny-qwen3"):
        model, _ = build(name, torch.float32, torch.device("cpu"))
        assert supports(model) is None
    gemma, _ = build("tiny-gemma2", torch.float32, torch.device("cpu"))
    assert "model_type" in supports(gemma)                        # the reference forward serves it
    with Engine(EngineConfig(model="tiny-gemma2", draft="none", online=False, dtype="float32")) as eng:
        assert eng.runner.fast is None
    model.config.hidden_act = "gelu"
    assert supports(model) == "activation 'gelu'"
    with Engine(EngineConfig(model="tiny-llama", draft="none", online=False, compile="static",
                             dtype="float32")) as eng:
        assert eng.runner.fast is None                            # the compiled path has its own step


@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.skipif(
    not packing_supported(torch.bfloat16), reason="this CPU's oneDNN cannot pack bf16")), pytest.param(torch.float32, id="fp32")])
def test_fused_packed_gemm_equals_the_separate_calls(dtype):
    torch.manual_seed(0)
    lins = [torch.nn.Linear(96, n, bias=False).to(dtype) for n in (96, 32, 32)]
    wrapped = [PackedLinear(m) for m in lins]
    x_rows = [torch.randn(n, 96).to(dtype) for n in (1, 3, 8, 64)]
    with torch.inference_mode():
        separate = [torch.cat([w(x) for w in wrapped], -1) for x in x_rows]
        fused = FusedPacked(wrapped)
        assert all(w.fused for w in wrapped)                      # their own copies are released ...
        for x, want in zip(x_rows, separate):
            assert torch.equal(fused(x), want)
            plain = torch.cat([w(x) for w in wrapped], -1)        # ... they take F.linear (fp32: its rounding)
            assert torch.equal(plain, want) if dtype == torch.bfloat16 else torch.allclose(plain, want, atol=1e-5)
        long = torch.randn(PLAIN_FROM_ROWS, 96).to(dtype)               # a long prompt: plain GEMMs
        parts = fused(long)                                       # separate outputs, no concatenation copy
        assert isinstance(parts, tuple) and all(torch.equal(p, F.linear(long, m.weight)) for p, m in zip(parts, lins))
    with pytest.raises(ValueError, match="biased"):
        FusedPacked([PackedLinear(torch.nn.Linear(8, 8).to(dtype))])


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen2"])
def test_bf16_engine_fuses_its_projections_when_packed(model):
    with Engine(EngineConfig(model=model, draft="none", online=False, dtype="bfloat16")) as eng:
        fast = eng.runner.fast
        assert fast is not None
        packed = eng.stats()["packed_linear_bytes"] > 0
        biased = model == "tiny-qwen2"                            # q/k/v biases: separate calls
        assert all(isinstance(layer.qkv, FusedPacked) == (packed and not biased) for layer in fast.layers)
        assert all(isinstance(layer.gate_up, FusedPacked) == packed for layer in fast.layers)
        out = eng.generate_batch(PROMPTS, SamplingParams(max_tokens=6, temperature=0))
    assert all(len(o.token_ids) == 6 for o in out)


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen3"])
def test_long_prompt_projections_run_apart_and_equal_the_reference_in_bf16(model, monkeypatch):
    """From PLAIN_FROM_ROWS rows the projections come back as separate outputs (q/k/v and gate/up
    not concatenated) and RoPE runs on q and k apart; the step is still the reference's bits."""
    monkeypatch.setattr("aurora.models.packed_linear.PLAIN_FROM_ROWS", 8)     # every prompt step is "long"
    calls: list[int] = []
    with Engine(EngineConfig(model=model, draft="none", online=False, dtype="bfloat16")) as eng:
        layer = eng.runner.fast.layers[0]
        x = torch.randn(9, layer.norm1.weight.shape[0]).to(torch.bfloat16)
        assert isinstance(layer.qkv(x), tuple) and isinstance(layer.gate_up(x), tuple)
        eng.runner.forward = _both_paths(eng.runner, calls)
        eng.generate_batch(PROMPTS, SamplingParams(max_tokens=1, temperature=0))
    assert calls and min(calls) >= 8


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen3"])
def test_tail_step_runs_the_last_layer_for_the_logits_rows_only(model):
    """A step whose rows without logits nobody reads (no step hook) runs its last layer for the
    root and tree rows only (step.py, `tail`): a long prompt chunk beside decoding sequences with
    draft trees gives the same logits as the full step (fp32), the same K/V in the cache, and the
    same greedy tokens end to end; an attached step hook (which may read every row's hidden state)
    turns it off."""
    from aurora.engine.step import build_step
    long_prompt = " ".join(f"w{i}" for i in range(80))
    greedy = SamplingParams(max_tokens=10, temperature=0)
    outs, tails = {}, {}
    for hooked in (False, True):
        with Engine(EngineConfig(model=model, draft="ngram", online=False, dtype="float32",
                                 spec=SpecConfig(adaptive=False), prefill_chunk=48)) as eng:
            seen = []
            forward = eng.runner.forward

            def spy(batch, forward=forward, seen=seen):
                result = forward(batch)
                seen.append((batch.tail_query_start is not None, result.hidden is None))
                return result
            eng.runner.forward = spy
            if hooked:
                eng.step_hooks.append(lambda view: None)
            outs[hooked] = [o.token_ids for o in eng.generate_batch(PROMPTS + [long_prompt], greedy)]
            tails[hooked] = seen
    assert outs[False] == outs[True]
    assert any(t and none for t, none in tails[False])                    # the tail ran, hidden was None
    assert not any(t or none for t, none in tails[True])
    assert all(t == none for t, none in tails[False])

    # a forward that would ignore a tail (transformers' path) is never handed one
    with Engine(EngineConfig(model=model, draft="none", online=False, dtype="float32", prefill_chunk=48,
                             fast_path=False)) as eng:
        seen = []
        forward = eng.runner.forward
        eng.runner.forward = lambda batch: seen.append(batch.tail_query_start) or forward(batch)
        eng.generate_batch([long_prompt], SamplingParams(max_tokens=2, temperature=0))
        assert not eng.runner.supports_tail and len(seen) >= 2 and all(t is None for t in seen)

    # one mixed step, tail vs full: a 48-row chunk, two decoders, one with a draft tree
    from aurora.engine.tree import DraftTree
    with Engine(EngineConfig(model=model, draft="none", online=False, dtype="float32",
                             prefill_chunk=48)) as eng:
        seqs = []

        def prepare():
            for text in PROMPTS[:2]:
                eng.add_request(eng.encode_prompt(text), SamplingParams(max_tokens=50, temperature=0))
            eng._drain_inbox()
            while not eng.scheduler.running or any(s.num_uncached != 1 for s in eng.scheduler.running):
                eng.step()
            eng.add_request(eng.encode_prompt(long_prompt), SamplingParams(max_tokens=5, temperature=0))
            eng._drain_inbox()
            seqs.extend(eng.scheduler.schedule(eng.policy.budget))
            tree = DraftTree()
            root = tree.add(5, -1)
            tree.add(7, root)
            tree.add(9, -1)
            trees = [None] * len(seqs)
            trees[next(i for i, s in enumerate(seqs) if s.num_uncached == 1)] = tree
            results = {}
            for tail in (False, True):
                batch, _ = build_step(seqs, trees, eng.config.block_size, eng.device, tail)
                results[tail] = (eng.runner.forward(batch), [eng.runner.cache.layer(i)[0][batch.slot_mapping].clone()
                                                             for i in range(eng.runner.num_layers)])
            return results
        results = eng.run_on_worker(prepare)
        assert sorted(s.num_step_tokens for s in seqs) == [1, 1, 48]
        full, tail = results[False], results[True]
        assert full[0].hidden is not None and tail[0].hidden is None
        torch.testing.assert_close(tail[0].logits, full[0].logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(tail[0].logits.argmax(-1), full[0].logits.argmax(-1))
        for a, b in zip(tail[1], full[1]):                                # every layer's K of all rows
            assert torch.equal(a, b)
