"""The compiled target step and quantized targets (fp32, tiny presets):

* the static attention equals the reference paged tree attention (the spec) on random steps;
* the static path (uncompiled) and the compiled path (inductor) give eager's greedy tokens, and
  speculative greedy equals plain greedy with compilation on, for ngram and eagle drafts;
* no recompilation after the start-up warm-up; sampled output follows the target (chi-square);
* quantized targets: speculative greedy equals plain greedy on the same quantized weights;
* CUDA graphs (`-m gpu`): the same exactness on a GPU, skipped without one.
"""
from __future__ import annotations

import collections

import pytest
import torch
from scipy.stats import chisquare

from aurora import Engine, EngineConfig, SamplingParams, SpecConfig
from aurora.kernels.paged_attention_static import paged_attention_static, plan_static
from aurora.kernels.reference import paged_tree_attention_ref
from aurora.models.compiled import num_graphs

PROMPTS = ["hello world", "The quick brown fox jumps over the lazy dog. The quick brown fox",
           "abcabcabcabcabcabc", "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n"]


def greedy(n: int = 24) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def tokens(engine, prompts=PROMPTS, n: int = 24) -> list[list[int]]:
    return [o.token_ids for o in engine.generate_batch(prompts, greedy(n), timeout=600)]


# ----------------------------------------------------------------------------- static attention

def _random_step(num_cached: list[int], num_new: list[int], block_size: int, heads: int, kv_heads: int,
                 dim: int, seed: int):
    """A step over sequences with random block tables and a random tree mask (causal + ancestors)."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-(c + n) // block_size) for c, n in zip(num_cached, num_new)) + 3
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, slots, positions, starts, seq_lens = [], [], [], [0], []
    max_new, total = max(num_new), sum(num_new)
    tree_mask = torch.zeros(total, max_new, dtype=torch.bool)
    for c, n in zip(num_cached, num_new):
        ids = [perm.pop() for _ in range(-(-(c + n) // block_size))]
        tables.append(ids)
        slots += [ids[p // block_size] * block_size + p % block_size for p in range(c, c + n)]
        depth = [0] * n
        parent = [-1] * n
        for i in range(1, n):                                     # random tree over the new tokens
            parent[i] = int(torch.randint(0, i, (1,), generator=g))
            depth[i] = depth[parent[i]] + 1
        for i in range(n):
            j = i
            while j >= 0:
                tree_mask[starts[-1] + i, j] = True
                j = parent[j]
        positions += [c + d for d in depth]
        starts.append(starts[-1] + n)
        seq_lens.append(c + n)
    bt = torch.zeros(len(tables), max(len(t) for t in tables), dtype=torch.int32)
    for i, t in enumerate(tables):
        bt[i, :len(t)] = torch.tensor(t, dtype=torch.int32)
    pool_k = torch.randn(num_blocks * block_size, kv_heads, dim, generator=g)
    pool_v = torch.randn(num_blocks * block_size, kv_heads, dim, generator=g)
    q = torch.randn(total, heads, dim, generator=g)
    k_new = torch.randn(total, kv_heads, dim, generator=g)
    v_new = torch.randn(total, kv_heads, dim, generator=g)
    meta = (bt, torch.tensor(seq_lens, dtype=torch.int32), torch.tensor(starts, dtype=torch.int32), tree_mask,
            torch.tensor(positions))
    return q, k_new, v_new, pool_k, pool_v, torch.tensor(slots), meta


@pytest.mark.parametrize("num_cached,num_new", [([0], [7]), ([37], [1]), ([20], [6]),
                                                ([5, 40, 0], [3, 1, 9]), ([16, 17], [1, 1])])
@pytest.mark.parametrize("window,softcap", [(None, None), (8, None), (None, 30.0), (12, 50.0)])
def test_static_attention_equals_reference(num_cached, num_new, window, softcap):
    block_size, heads, kv_heads, dim = 4, 6, 2, 8
    q, k_new, v_new, pool_k, pool_v, slots, meta = _random_step(num_cached, num_new, block_size, heads,
                                                                kv_heads, dim, seed=sum(num_cached) + len(num_new))
    plan = plan_static(*meta, block_size, windows=(None, window), kv_multiple=block_size, q_multiple=2)
    out = paged_attention_static(q, k_new, v_new, pool_k, pool_v, plan, window, 0.3, softcap)
    written_k, written_v = pool_k.clone(), pool_v.clone()
    written_k[slots], written_v[slots] = k_new, v_new
    ref = paged_tree_attention_ref(q, written_k, written_v, *meta[:4], meta[4], block_size, 0.3, window, softcap)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- static path, eager

@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen3", "tiny-gemma2"])
def test_static_path_equals_eager(engines, model):
    """compile="static": the graph's code run uncompiled gives eager's greedy tokens, spec included."""
    ref = tokens(engines.get(model))
    assert tokens(engines.get(model, compile="static")) == ref
    assert tokens(engines.get(model, "ngram", compile="static")) == ref


def test_bad_knobs_have_clear_errors():
    with pytest.raises(ValueError, match="compile"):
        EngineConfig(compile="yes")
    with pytest.raises(ValueError, match="quantize"):
        EngineConfig(quantize="int3")


# ----------------------------------------------------------------------------- compiled (inductor)

COMPILED = "tiny-llama"


@pytest.fixture(scope="module")
def compiled_plain(engines):
    return engines.get(COMPILED, compile="on")


@pytest.mark.slow                  # inductor compiles 4 graphs per engine: minutes on a busy 2-core CPU
@pytest.mark.exactness             # ...but `make test` keeps the compiled exactness proofs
def test_compiled_greedy_equals_eager(engines, compiled_plain):
    assert tokens(compiled_plain) == tokens(engines.get(COMPILED))


@pytest.mark.parametrize("draft,shape", [("ngram", "chain"), ("eagle", "chain"), ("eagle", "dynamic"),
                                         ("eagle+ngram", "static")])
@pytest.mark.slow
@pytest.mark.exactness
def test_compiled_spec_greedy_equals_plain(engines, compiled_plain, draft, shape):
    """Speculative greedy == plain greedy, both compiled; no graph compiled after warm-up."""
    ref = tokens(compiled_plain)
    eng = engines.get(COMPILED, draft, SpecConfig(shape=shape), compile="on", max_batch=4)
    before = num_graphs()
    assert tokens(eng) == ref
    assert num_graphs() == before, "the compiled step recompiled while serving"
    st = eng.stats()
    assert st["num_tokens"] > st["num_steps"], "nothing was accepted: the test proves little"


@pytest.mark.slow
def test_compiled_sampling_matches_target_distribution(engines):
    """chi-square at 1e-3 over the first 3 sampled tokens of 1000 seeded requests (ngram draft,
    compiled), against exact probabilities from the eager engine's own forward."""
    model, n, k = "tiny-gemma2", 1000, 3
    kw = {"max_tokens": k, "temperature": 3.0, "top_k": 3, "ignore_eos": True}
    eager = engines.get(model)
    base = eager.encode_prompt("hello world")
    prompt = base + eager.generate_batch([base], greedy(12))[0].token_ids
    eng = engines.get(model, "ngram", compile="on", max_batch=64)
    outs = eng.generate_batch([prompt] * n, [SamplingParams(seed=i, **kw) for i in range(n)], timeout=900)
    from test_exactness import _sequence_probs                    # exact target probabilities (transformers)
    probs = _sequence_probs(model, prompt, SamplingParams(**kw))
    counts = collections.Counter(tuple(o.token_ids) for o in outs)
    assert set(counts) <= set(probs)
    keys = sorted(probs, key=probs.get, reverse=True)
    big = [c for c in keys if probs[c] * n >= 5]
    small = [c for c in keys if probs[c] * n < 5]
    assert len(big) >= 10
    obs = [counts[c] for c in big] + [sum(counts[c] for c in small)]
    exp = [probs[c] * n for c in big] + [sum(probs[c] for c in small) * n]
    exp = [e * n / sum(exp) for e in exp]
    assert chisquare(obs, exp).pvalue > 1e-3


# ----------------------------------------------------------------------------- quantized targets

@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantized_spec_greedy_equals_plain(engines, quantize):
    """Exactness against the same quantized weights; the quantized model is not the fp32 one."""
    plain = engines.get("tiny-llama", quantize=quantize)
    ref = tokens(plain)
    assert tokens(engines.get("tiny-llama", "ngram", quantize=quantize)) == ref
    assert tokens(engines.get("tiny-llama", "eagle", SpecConfig(shape="static"), quantize=quantize)) == ref
    assert tokens(engines.get("tiny-llama", quantize=quantize, compile="static")) == ref


def test_quantized_linear_matches_its_dequantized_weights():
    from aurora.models.quant import Int4Linear, Int8Linear
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48, bias=True)
    x = torch.randn(5, 64)
    for cls, tol in ((Int8Linear, 0.02), (Int4Linear, 0.2)):
        q = cls(lin)
        w = q.dequantized()
        torch.testing.assert_close(q(x), x @ w.t() + lin.bias, rtol=1e-4, atol=1e-4)
        assert (w - lin.weight).abs().max() < tol * lin.weight.abs().max()


def test_int4_reproduces_q4_1_weights_exactly():
    """Weights that already are Q4_1 values (min + q * d per group of 32) survive int4 unchanged."""
    from aurora.models.quant import Int4Linear
    torch.manual_seed(0)
    n, k = 32, 64
    d = torch.rand(n, k // 32, 1) * 0.1 + 0.01
    low = torch.randn(n, k // 32, 1)
    q = torch.randint(0, 16, (n, k // 32, 32))
    q[..., 0], q[..., 1] = 0, 15                                # every group spans its full range
    w = (low + q * d).reshape(n, k)
    lin = torch.nn.Linear(k, n, bias=False)
    lin.weight.data.copy_(w)
    torch.testing.assert_close(Int4Linear(lin).dequantized(), w, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- CUDA graphs

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gemma2"])
def test_cuda_graphs_greedy_exact(fresh_engine, model):
    """CUDA graphs (reduce-overhead) for decode and tree-verify shapes: fp32 greedy equals eager on
    the GPU, speculative equals plain, and serving after warm-up captures no new graph shapes
    beyond the bucketed ones it warmed (tokens, queries and cached keys are bucketed)."""
    eager = tokens(fresh_engine(model, device="cuda"))
    plain = fresh_engine(model, device="cuda", compile="on")
    assert plain.runner.compiled.mode == "cuda-graphs"
    assert tokens(plain) == eager
    spec = fresh_engine(model, "ngram", device="cuda", compile="on", max_batch=4)
    assert tokens(spec) == eager
    before = num_graphs()
    assert tokens(spec) == eager
    assert num_graphs() == before


def test_llamacpp_peer_is_skipped_with_a_clear_reason():
    import importlib.util

    from aurora.bench.systems import BuildOptions, Unavailable, build_system
    if importlib.util.find_spec("llama_cpp") is not None:
        pytest.skip("llama-cpp-python is installed: the bench runs the peer")
    with pytest.raises(Unavailable, match="llama-cpp-python is not installed"):
        build_system("llamacpp", BuildOptions(model="tiny-llama"))
