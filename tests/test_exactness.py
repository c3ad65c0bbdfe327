"""Exactness against references on the three tiny presets (fp32):

* plain greedy decoding equals transformers' `generate` on a separately built copy of the
  same model (identical weights by seed), batch 1 and batched;
* speculative greedy equals plain greedy for every draft in DRAFTS and every tree shape,
  in mixed batches (greedy + sampled) with requests joining mid-flight;
* speculative sampling follows the target distribution: the first three sampled tokens of
  many seeded requests are chi-square-tested against the exact sequence probabilities
  computed with the reference model (significance ALPHA = 1e-3, fixed seeds).
"""
from __future__ import annotations

import collections
import functools
import random

import pytest
import torch
from scipy.stats import chisquare

from aurora import Engine, EngineConfig, SamplingParams, SpecConfig
from aurora.drafts import Proposer
from aurora.drafts.ngram import lookup
from aurora.engine.sampling import processed_probs
from aurora.engine.tree import DraftTree

TINY_MODELS = ["tiny-llama", "tiny-qwen3", "tiny-gemma2"]
# Drafts under test; extend with "eagle", "model:tiny-llama", "eagle+ngram", ...
DRAFTS = ["ngram", "eagle", "eagle+ngram", "model:tiny-llama"]
SHAPES = ["chain", "static", "dynamic"]
# A test-only proposer (below): the ngram chain grafted among decoy nodes, so accepted paths
# skip node indices and the engine must move KV and mask siblings. Not part of DRAFTS.
DECOY = "decoy+ngram"
ALPHA = 1e-3
N_NEW = 40

PROMPTS = [
    "hello world",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n",
    "x",
    # longer than the sliding windows of tiny-qwen3 (24) and tiny-gemma2 (20)
    "In the beginning the Universe was created. This has made a lot of people very angry.",
    "abcabcabcabcabcabc",
    "¿Qué tal? Ça va — très bien, merci!",
]


def greedy(max_tokens: int = N_NEW) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


@functools.cache
def hf_model(name: str):
    from aurora.models import presets
    model, tok = presets.build(name, torch.float32, torch.device("cpu"))
    assert model.config._attn_implementation != "aurora_paged"
    model.generation_config.eos_token_id = None            # run to max_new_tokens, like ignore_eos
    return model, tok


@functools.cache
def hf_greedy(name: str, prompt_ids: tuple[int, ...], n: int) -> list[int]:
    model, _ = hf_model(name)
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def encode(engine, prompt) -> tuple[int, ...]:
    return tuple(engine.encode_prompt(prompt))


def self_repeating_prompt(plain, n: int = 16) -> list[int]:
    """A prompt that ends where it began, followed by the model's own continuation: ngram
    proposes long runs the target accepts, then diverges (partial acceptance, KV moves)."""
    base = plain.encode_prompt("repeat after me: ")
    cont = plain.generate_batch([base], greedy(n))[0].token_ids
    return base + cont + base


class DecoyTreeProposer(Proposer):
    """Root: two decoy subtrees first, then the ngram chain with a decoy child under every
    chain node. Decoys are point masses (deterministic given the context), so speculative
    sampling stays lossless and greedy stays exact."""
    name = DECOY

    def propose(self, seqs, ctx):
        trees = []
        for seq in seqs:
            rng = random.Random(hash(tuple(seq.token_ids[-8:])))
            cont = lookup(seq.token_ids[-1024:], ctx.spec.depth, ctx.spec.ngram_max, ctx.spec.ngram_min)
            tree = DraftTree()
            for _ in range(2):
                tree.add(rng.randrange(ctx.vocab_size), tree.add(rng.randrange(ctx.vocab_size), -1))
            parent = -1
            for tok in cont:
                parent = tree.add(tok, parent)
                tree.add(rng.randrange(ctx.vocab_size), parent)
            trees.append(tree)
        return trees


@pytest.fixture(scope="module")
def spec_engine(engines):
    """spec_engine(model, draft, shape, **options): shared engines; DECOY engines are private."""
    private: dict = {}

    def get(model, draft, shape="chain", **options):
        spec = SpecConfig(shape=shape)
        if draft != DECOY:
            return engines.get(model, draft, spec, **options)
        key = (model, shape, tuple(sorted(options.items())))
        if key not in private:
            eng = Engine(EngineConfig(model=model, draft="none", spec=spec, dtype="float32", online=False, **options))
            eng.proposer = DecoyTreeProposer()
            private[key] = eng
        return private[key]
    yield get
    for eng in private.values():
        eng.close()


# ----------------------------------------------------------------------------- vs transformers

@pytest.mark.parametrize("model", TINY_MODELS)
def test_plain_greedy_equals_transformers_batch1(engines, model):
    eng = engines.get(model)
    for prompt in PROMPTS:
        out = eng.generate_batch([prompt], greedy())[0]
        assert out.token_ids == hf_greedy(model, encode(eng, prompt), N_NEW), prompt


@pytest.mark.parametrize("model", TINY_MODELS)
def test_plain_greedy_equals_transformers_batched(engines, model):
    eng = engines.get(model)
    outs = eng.generate_batch(PROMPTS, greedy())
    for prompt, out in zip(PROMPTS, outs):
        assert out.token_ids == hf_greedy(model, encode(eng, prompt), N_NEW), prompt


def test_reference_model_differs_between_presets():
    """Guard: the reference comparison is not vacuous (different presets, different outputs)."""
    a = hf_greedy("tiny-llama", (10, 20, 30), 8)
    b = hf_greedy("tiny-qwen3", (10, 20, 30), 8)
    assert a != b


# ----------------------------------------------------------------------------- spec == plain

SPEC_CASES = [(d, s) for d in DRAFTS for s in SHAPES] + [(DECOY, "chain")]   # DECOY ignores shapes


@pytest.mark.parametrize("draft,shape", SPEC_CASES)
@pytest.mark.parametrize("model", TINY_MODELS)
def test_spec_greedy_equals_plain(engines, spec_engine, model, draft, shape):
    plain = engines.get(model)
    spec = spec_engine(model, draft, shape)
    prompts = PROMPTS + [self_repeating_prompt(plain)]
    want = [o.token_ids for o in plain.generate_batch(prompts, greedy())]
    got = spec.generate_batch(prompts, greedy())
    assert [o.token_ids for o in got] == want
    for prompt, out, ids in zip(prompts, got, want):        # and batch 1
        if isinstance(prompt, list):
            assert spec.generate_batch([prompt], greedy())[0].token_ids == ids
    if "ngram" in draft:
        assert spec.stats()["accepted_length"] > 1.0, "speculation never accepted anything"


@pytest.mark.parametrize("draft,shape", SPEC_CASES)
@pytest.mark.parametrize("model", TINY_MODELS)
def test_spec_greedy_mixed_batch_joining_mid_flight(engines, spec_engine, staggered, model, draft, shape):
    """Greedy requests (different lengths) and seeded sampled requests share batches; half join
    while the others run. Every greedy output equals plain greedy of the request alone."""
    plain = engines.get(model)
    assert_mixed_batch_exact(plain, spec_engine(model, draft, shape), staggered,
                             [self_repeating_prompt(plain)] + PROMPTS, lambda i: N_NEW - 3 * i)


def assert_mixed_batch_exact(plain, spec, staggered, prompts, greedy_len) -> None:
    """Every third request is seeded sampled, the rest greedy of `greedy_len(i)` tokens; three
    start, the others join mid-flight. All run to length; greedy ones equal plain greedy alone."""
    params = []
    for i in range(len(prompts)):
        if i % 3 == 2:
            params.append(SamplingParams(max_tokens=20 + i, temperature=0.9, top_p=0.9, seed=i, ignore_eos=True))
        else:
            params.append(greedy(greedy_len(i)))
    want = {i: plain.generate_batch([p], params[i])[0].token_ids
            for i, p in enumerate(prompts) if params[i].greedy}
    outs, _ = staggered(spec, prompts, params, num_first=3)
    for i, out in enumerate(outs):
        assert out.finish_reason == "length" and len(out.token_ids) == params[i].max_tokens
        if i in want:
            assert out.token_ids == want[i], (i, prompts[i])


# ----------------------------------------------------------------------------- spec sampling

SAMPLING_MODEL = "tiny-gemma2"      # repetitive even when sampled: ngram proposals get accepted
SAMPLING_N = 1500
SAMPLING_K = 3


def _sequence_probs(model: str, prompt: list[int], params: SamplingParams) -> dict[tuple, float]:
    """Exact probability of every K-token continuation under the processed target."""
    ref, _ = hf_model(model)
    probs: dict[tuple, float] = {}

    def walk(prefix: tuple, mass: float):
        if len(prefix) == SAMPLING_K:
            probs[prefix] = mass
            return
        with torch.inference_mode():
            logits = ref(torch.tensor([prompt + list(prefix)])).logits[0, -1:]
        dist = processed_probs(logits, params)[0]
        for tok in torch.nonzero(dist).flatten().tolist():
            walk(prefix + (tok,), mass * float(dist[tok]))
    walk((), 1.0)
    return probs


def shapes_for(draft: str) -> list[str]:
    """ngram and model drafts propose chains whatever the shape (at default depth <= max_nodes)."""
    agnostic = all(part == "ngram" or part.startswith("model:") for part in draft.split("+"))
    return ["chain"] if agnostic else SHAPES


@pytest.mark.parametrize("draft,shape", [("none", "chain"), (DECOY, "chain")]
                         + [(d, s) for d in DRAFTS for s in shapes_for(d)])
def test_spec_sampling_matches_target_distribution(engines, spec_engine, draft, shape):
    """chi-square at ALPHA=1e-3 (fixed seeds): SAMPLING_N seeded requests, temperature 3 and
    top-k 3; the distribution of their first SAMPLING_K tokens equals the exact target one."""
    plain = engines.get(SAMPLING_MODEL)
    eng = spec_engine(SAMPLING_MODEL, draft, shape, max_batch=64)
    base = plain.encode_prompt("hello world")
    prompt = base + plain.generate_batch([base], greedy(12))[0].token_ids
    kw = {"max_tokens": SAMPLING_K, "temperature": 3.0, "top_k": 3, "ignore_eos": True}
    probs = _sequence_probs(SAMPLING_MODEL, prompt, SamplingParams(**kw))
    outs = eng.generate_batch([prompt] * SAMPLING_N, [SamplingParams(seed=i, **kw) for i in range(SAMPLING_N)],
                              timeout=300)
    counts = collections.Counter(tuple(o.token_ids) for o in outs)
    assert set(counts) <= set(probs), "a continuation with zero target probability was sampled"
    keys = sorted(probs, key=probs.get, reverse=True)
    big = [k for k in keys if probs[k] * SAMPLING_N >= 5]
    small = [k for k in keys if probs[k] * SAMPLING_N < 5]
    assert len(big) >= 10                                       # the test has cells to judge
    obs = [counts[k] for k in big] + [sum(counts[k] for k in small)]
    exp = [probs[k] * SAMPLING_N for k in big] + [sum(probs[k] for k in small) * SAMPLING_N]
    exp = [e * SAMPLING_N / sum(exp) for e in exp]
    pvalue = chisquare(obs, exp).pvalue
    assert pvalue > ALPHA, f"sampled continuations differ from the target distribution (p={pvalue:.2e})"
    if "ngram" in draft:
        taus = [o.stats["accepted_length"] for o in outs if o.stats["num_steps"]]
        assert sum(taus) / len(taus) > 1.2, "the draft was hardly ever accepted: the test proves little"


# ----------------------------------------------------------------------------- draft contract

# Drafts that sample their proposals: every sampled node must be a draw from the q row it
# names (verification assumes i.i.d. siblings; reordering or selecting draws by their
# probability, as a top-scoring expansion would, breaks losslessness).
Q_DRAFT_CASES = [("eagle", "chain"), ("eagle", "static"),
                 ("eagle", "dynamic")]


@pytest.mark.parametrize("draft,shape", Q_DRAFT_CASES)
def test_sampled_draft_nodes_are_draws_from_their_q(spec_engine, draft, shape):
    """chi-square at ALPHA=1e-3: over many seeded requests, the first sampled child of the
    root is distributed as its q row (expected counts: the sum of the q rows)."""
    eng = spec_engine("tiny-llama", draft, shape, max_batch=64)
    observed = torch.zeros(eng.runner.vocab_size, dtype=torch.float64)
    expected = torch.zeros_like(observed)

    def hook(view):
        for tree in view.trees:
            if tree is None or tree.q_probs is None:
                continue
            sampled = [c for c in tree.children(-1) if tree.q_rows[c] >= 0]
            if sampled:
                observed[tree.token_ids[sampled[0]]] += 1
                expected.add_(tree.q_probs[tree.q_rows[sampled[0]]].double())
    eng.step_hooks.append(hook)
    try:
        n = 400
        eng.generate_batch(["hello world"] * n, [SamplingParams(max_tokens=2, temperature=3.0, top_k=3, seed=i,
                                                                ignore_eos=True) for i in range(n)], timeout=300)
    finally:
        eng.step_hooks.remove(hook)
    assert observed.sum() >= n // 2, "the draft proposed too few sampled nodes to judge"
    assert observed[expected == 0].sum() == 0, "a node was proposed with zero q probability"
    big = expected >= 5
    obs = observed[big].tolist() + [float(observed[~big].sum())]
    exp = expected[big].tolist() + [float(expected[~big].sum())]
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    exp = [e * sum(obs) / sum(exp) for e in exp]
    pvalue = chisquare(obs, exp).pvalue
    assert pvalue > ALPHA, f"sampled draft nodes are not draws from their q rows (p={pvalue:.2e})"
