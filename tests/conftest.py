"""Shared fixtures: engines cached per (model, draft, spec, options) for the whole session,
a fresh-engine factory for tests that inspect counters or mutate an engine, and the real
default model (tests using it are marked slow automatically).

Engines run on the process's compute thread; every engine made here is closed at the end.
`SpecConfig()` means the fixed tree in tests (see `_fixed_tree_unless_asked`).
"""
from __future__ import annotations

import threading

import pytest
import torch

from aurora import Engine, EngineConfig, SamplingParams, SpecConfig


def _fixed_tree_unless_asked():
    """Serving defaults to the adaptive policy (`SpecConfig.adaptive=True`), which switches
    speculation off where it does not pay: on tiny random models nothing is accepted, so tests
    of the speculation code paths (exactness, chi-square, isolation, the flywheel) would never
    reach them. In tests, `SpecConfig()` therefore means the fixed tree; tests of the policy ask
    for it (`SpecConfig(adaptive=True)`), and test_policy checks the real default. Likewise the
    learned draft's confidence cut (`eagle_min_prob`) would stop a random tiny head after one
    level, so tests get full-depth eagle trees unless they ask for the cut (test_eagle_batch)."""
    import dataclasses
    names = [f.name for f in dataclasses.fields(SpecConfig)]
    defaults = list(SpecConfig.__init__.__defaults__)
    assert len(defaults) == len(names), "every SpecConfig field has a default"
    defaults[names.index("adaptive")] = False
    defaults[names.index("eagle_min_prob")] = 0.0
    SpecConfig.__init__.__defaults__ = tuple(defaults)


_fixed_tree_unless_asked()

TINY_MODELS = ("tiny-llama", "tiny-qwen3", "tiny-gemma2")
REAL_MODEL = "smollm2-135m"
DEFAULTS = {"dtype": "float32", "online": False}


class EnginePool:
    """Engines keyed by their full configuration. Shared engines must be left idle and
    unmodified by the tests that borrow them (counters keep accumulating)."""

    def __init__(self):
        self._engines: dict = {}
        self._lock = threading.Lock()

    def get(self, model: str = "tiny-llama", draft: str = "none", spec: SpecConfig | None = None,
            **options) -> Engine:
        options = {**DEFAULTS, **options}
        key = (model, draft, spec or SpecConfig(), tuple(sorted(options.items())))
        with self._lock:
            if key not in self._engines:
                self._engines[key] = Engine(EngineConfig(model=model, draft=draft, spec=spec or SpecConfig(),
                                                         **options))
            return self._engines[key]

    def close(self) -> None:
        for eng in self._engines.values():
            eng.close()
        self._engines.clear()


@pytest.fixture(scope="session")
def engines():
    pool = EnginePool()
    yield pool
    pool.close()


@pytest.fixture
def fresh_engine():
    """Factory of private engines (closed after the test): for counters, tiny KV pools, hacks."""
    made: list[Engine] = []

    def make(model: str = "tiny-llama", draft: str = "none", spec: SpecConfig | None = None, **options):
        eng = Engine(EngineConfig(model=model, draft=draft, spec=spec or SpecConfig(), **{**DEFAULTS, **options}))
        made.append(eng)
        return eng
    yield make
    for eng in made:
        eng.close()


@pytest.fixture(scope="session")
def real_engine(engines):
    """smollm2-135m, fp32, no draft (plain greedy reference for the real model)."""
    return engines.get(REAL_MODEL)


@pytest.fixture(scope="session")
def hf_real_model():
    """A separately loaded transformers copy of smollm2-135m (fp32, sdpa): the reference."""
    from transformers import AutoModelForCausalLM

    from aurora.models.loader import _cached_gguf
    model = AutoModelForCausalLM.from_pretrained(_cached_gguf(REAL_MODEL), dtype=torch.float32,
                                                 attn_implementation="sdpa")
    model.eval().requires_grad_(False)
    return model


_SLOW_FIXTURES = {"real_engine", "hf_real_model"}


def pytest_collection_modifyitems(config, items):
    """Anything touching the real model is slow (deselect with -m 'not slow')."""
    for item in items:
        if _SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def run_staggered(engine: Engine, prompts: list, params: list[SamplingParams], num_first: int,
                  min_tokens: int = 3, timeout: float = 120.0):
    """Submit the first `num_first` requests; once each has streamed `min_tokens` tokens (or
    finished), submit the rest while those are still running. Returns (final outputs in
    order, event log of (index, "first" | "finish") in engine order)."""
    n = len(prompts)
    lock = threading.Lock()
    results: dict[int, object] = {}
    events: list[tuple[int, str]] = []
    progressed: set[int] = set()
    ready, done = threading.Event(), threading.Event()

    def make_cb(i):
        def cb(out):
            with lock:
                if out.token_ids and not any(e == (i, "first") for e in events):
                    events.append((i, "first"))
                if i < num_first and (len(out.token_ids) >= min_tokens or out.finished):
                    progressed.add(i)
                    if len(progressed) == num_first:
                        ready.set()
                if out.finished:
                    events.append((i, "finish"))
                    results[i] = out
                    if len(results) == n:
                        done.set()
        return cb

    for i in range(num_first):
        engine.add_request(prompts[i], params[i], make_cb(i))
    assert ready.wait(timeout), "the first requests made no progress"
    for i in range(num_first, n):
        engine.add_request(prompts[i], params[i], make_cb(i))
    assert done.wait(timeout), "staggered requests did not finish"
    return [results[i] for i in range(n)], events


@pytest.fixture(scope="session")
def staggered():
    return run_staggered
