"""The real default model (smollm2-135m, fp32) against references: our plain greedy equals
transformers' `generate` on a separately loaded copy (batch 1 and batched), and speculative
greedy equals plain greedy for the default draft (`suffix+ngram`), `ngram` and `eagle+ngram`, on
varied real prompts (code, chat, prose, lists, repetition-heavy text).

fp32 paths that reduce in different orders can flip a genuine near-tie; a mismatch is only
tolerated where the reference's top-2 logit margin is below TIE_MARGIN (and reported).
"""
from __future__ import annotations

import functools
import warnings

import pytest
import torch

from aurora import SamplingParams, SpecConfig

pytestmark = [pytest.mark.slow, pytest.mark.exactness]   # slow, but `make test` keeps it

REAL = "smollm2-135m"
N_HF = 48
N_SPEC = 64
TIE_MARGIN = 1e-3
# The default draft, prompt lookup, and the composition with the learned draft. `eagle` alone
# (random init: it proposes chains the target rejects) is left to the tiny-model exactness
# tests: its nodes reach the real model's verification through `eagle+ngram` (its learned
# branch's gate probes even when closed), and alone it took ~40 s of `make test`. Tiny
# presets use a byte vocabulary: as drafts of the real model they only cost time.
REAL_DRAFTS = ["eagle+ngram", "ngram", "suffix+ngram"]

TEXT_PROMPTS = [
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "import numpy as np\n\ndef normalize(x):\n    # scale rows to unit norm\n",
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived",
    "Photosynthesis is the process by which plants",
    "Here is a list of the planets in our solar system:\n1. Mercury\n2. Venus\n3.",
    "SELECT name, COUNT(*) FROM orders GROUP BY name ORDER BY",
    "The stock market fell sharply on Tuesday after the central bank announced",
    "Q: What is 12 times 7?\nA:",
]
CHAT_MESSAGES = [
    [{"role": "user", "content": "Write a haiku about the ocean."}],
    [{"role": "user", "content": "How do I reverse a list in Python? Show code."}],
]


@pytest.fixture(scope="module")
def prompt_ids(real_engine) -> list[list[int]]:
    ids = [real_engine.encode_prompt(p) for p in TEXT_PROMPTS]
    ids += [real_engine.chat_prompt(m) for m in CHAT_MESSAGES]
    assert len(ids) >= 10
    return ids


@pytest.fixture(scope="module")
def hf_greedy(hf_real_model):
    @functools.cache
    def run(ids: tuple[int, ...], n: int) -> list[int]:
        x = torch.tensor([ids])
        with torch.inference_mode():
            out = hf_real_model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                         do_sample=False, eos_token_id=None, pad_token_id=0)
        return out[0, len(ids):].tolist()
    return run


@pytest.fixture(scope="module")
def plain_64(real_engine, prompt_ids) -> list[list[int]]:
    """Plain greedy, batched, N_SPEC tokens (its first N_HF tokens are the N_HF-token run)."""
    outs = real_engine.generate_batch(prompt_ids, SamplingParams(max_tokens=N_SPEC, temperature=0, ignore_eos=True),
                                      timeout=600)
    return [o.token_ids for o in outs]


def assert_same_greedy(model, prompt: list[int], got: list[int], want: list[int]) -> None:
    """Equal, or first divergent at a genuine near-tie of the reference logits."""
    if got == want:
        return
    i = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    assert len(got) == len(want) and i < len(want), f"lengths differ: {len(got)} vs {len(want)}"
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + want[:i]])).logits[0, -1].float()
    top2 = logits.topk(2).values
    margin = float(top2[0] - top2[1])
    assert margin < TIE_MARGIN and got[i] in logits.topk(2).indices.tolist(), (
        f"diverged at token {i}: got {got[i]}, want {want[i]} (reference margin {margin:.2e})")
    warnings.warn(f"greedy outputs diverge at a near-tie (token {i}, margin {margin:.1e})")


def test_plain_greedy_batched_equals_transformers(hf_real_model, hf_greedy, prompt_ids, plain_64):
    for ids, ours in zip(prompt_ids, plain_64):
        assert_same_greedy(hf_real_model, ids, ours[:N_HF], hf_greedy(tuple(ids), N_HF))


def test_plain_greedy_batch1_equals_transformers(real_engine, hf_real_model, hf_greedy, prompt_ids):
    sp = SamplingParams(max_tokens=N_HF, temperature=0, ignore_eos=True)
    for ids in prompt_ids[::4]:                                  # a spread of code, prose and chat
        ours = real_engine.generate_batch([ids], sp, timeout=300)[0].token_ids
        assert_same_greedy(hf_real_model, ids, ours, hf_greedy(tuple(ids), N_HF))


def test_real_text_is_sane(real_engine, plain_64, prompt_ids):
    """Guard against a silently broken model: the capital of France is Paris."""
    i = TEXT_PROMPTS.index("The capital of France is")
    text = real_engine.tokenizer.decode(plain_64[i], skip_special_tokens=True)
    assert "Paris" in text


@pytest.mark.parametrize("draft", REAL_DRAFTS)
def test_spec_greedy_equals_plain(engines, hf_real_model, prompt_ids, plain_64, draft):
    spec = engines.get(REAL, draft, SpecConfig(shape="chain"))
    learned = []                                   # learned-only nodes verified (eagle+ngram)
    hook = lambda view: learned.extend(len(t.learned) for t in view.trees if t is not None)
    spec.step_hooks.append(hook)
    try:
        outs = spec.generate_batch(prompt_ids, SamplingParams(max_tokens=N_SPEC, temperature=0, ignore_eos=True),
                                   timeout=600)
    finally:
        spec.step_hooks.remove(hook)
    for ids, out, want in zip(prompt_ids, outs, plain_64):
        assert_same_greedy(hf_real_model, ids, out.token_ids, want)
    if "eagle" in draft:
        assert sum(learned) > 0, "no learned node reached verification: the test proves nothing for eagle"
    if "ngram" in draft:
        s = spec.stats()
        assert s["accepted_length"] > 1.05, "ngram never accepted on real text: the test proves little"


def test_spec_greedy_joining_mid_flight(engines, staggered, hf_real_model, prompt_ids, plain_64):
    spec = engines.get(REAL, "ngram", SpecConfig(shape="chain"))
    sp = [SamplingParams(max_tokens=N_SPEC, temperature=0, ignore_eos=True)] * len(prompt_ids)
    outs, _ = staggered(spec, prompt_ids, sp, num_first=4, timeout=600)
    for ids, out, want in zip(prompt_ids, outs, plain_64):
        assert_same_greedy(hf_real_model, ids, out.token_ids, want)
