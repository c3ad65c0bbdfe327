"""Engine behaviour on tiny random presets: determinism, limits, stop handling, streaming,
cancellation, input validation, batch invariance, preemption under a tiny KV pool,
requests joining mid-flight, and the stats surface."""
from __future__ import annotations

import asyncio
import itertools
import time

import pytest

from aurora import EngineConfig, SamplingParams, SpecConfig
from aurora.models.loader import ModelNotFound

PROMPTS = [
    "hello world",
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "x",
    "Once upon a time there was a tiny random language model",
    "1, 2, 3, 4, 5, 6, 7,",
    "¿Qué tal? Ça va — très bien!",
    "aaaaaaaaaaaaaaaaaaaaaaaa",
]


def greedy(max_tokens: int = 32, **kw) -> SamplingParams:
    """Greedy params that run to max_tokens (random tiny models may emit EOS anywhere)."""
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


def wait_idle(engine, timeout: float = 10.0) -> dict:
    """Poll until the engine has no work and every KV block is free; return stats."""
    deadline = time.monotonic() + timeout
    while True:
        s = engine.stats()
        if s["running"] == 0 and s["waiting"] == 0 and s["kv_blocks_free"] == s["kv_blocks_total"]:
            return s
        if time.monotonic() > deadline:
            raise AssertionError(f"engine did not become idle: {s}")
        time.sleep(0.01)


def collect(agen_factory):
    async def run():
        return [out async for out in agen_factory()]
    return asyncio.run(run())


@pytest.fixture
def llama(engines):
    return engines.get("tiny-llama")


# ----------------------------------------------------------------------------- determinism

def test_greedy_is_deterministic(llama):
    a = llama.generate_batch(PROMPTS[:3], greedy(24))
    b = llama.generate_batch(PROMPTS[:3], greedy(24))
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert [o.text for o in a] == [o.text for o in b]


def test_same_seed_same_sample_and_seeds_matter(llama):
    def run(seed):
        return llama.generate_batch([PROMPTS[1]], SamplingParams(max_tokens=24, temperature=1.5, seed=seed,
                                                                  ignore_eos=True))[0].token_ids
    assert run(7) == run(7)
    outs = {tuple(run(s)) for s in range(4)}
    assert len(outs) > 1, "different seeds gave identical samples at temperature 1.5"


def test_seeded_sample_does_not_depend_on_batch(llama):
    sp = SamplingParams(max_tokens=20, temperature=1.2, top_p=0.95, seed=11, ignore_eos=True)
    alone = llama.generate_batch([PROMPTS[4]], sp)[0].token_ids
    others = [SamplingParams(max_tokens=20, temperature=1.2, seed=100 + i, ignore_eos=True) for i in range(5)]
    batch = llama.generate_batch(PROMPTS[:5], others[:4] + [sp])
    assert batch[4].token_ids == alone


# ----------------------------------------------------------------------------- limits and stops

@pytest.mark.parametrize("model,draft", [("tiny-llama", "none"), ("tiny-gemma2", "ngram")])
@pytest.mark.parametrize("max_tokens", [1, 2, 7, 33])
def test_max_tokens_respected(engines, model, draft, max_tokens):
    eng = engines.get(model, draft)
    outs = eng.generate_batch(PROMPTS[:3], greedy(max_tokens))
    for o in outs:
        assert len(o.token_ids) == max_tokens and o.finish_reason == "length" and o.finished
        assert o.stats["num_tokens"] == max_tokens


def test_max_model_len_caps_generation(fresh_engine):
    eng = fresh_engine("tiny-gemma2", "ngram", max_model_len=40)
    prompt = list(range(10, 40))                              # 30 tokens
    out = eng.generate_batch([prompt], greedy(100))[0]
    assert len(prompt) + len(out.token_ids) == 40 and out.finish_reason == "length"
    with pytest.raises(ValueError):
        eng.add_request(list(range(10, 50)), greedy(4))       # prompt alone reaches the limit


def _stop_string(text: str) -> tuple[str, int]:
    """A 2-character stop string first occurring at index >= 3 (avoiding replacement chars)."""
    for i in range(3, len(text) - 1):
        s = text[i:i + 2]
        if "\ufffd" not in s and text.find(s) == i:
            return s, i
    raise AssertionError(f"no usable stop string in {text!r}")


@pytest.mark.parametrize("model,draft", [("tiny-llama", "none"), ("tiny-qwen3", "ngram")])
def test_stop_string_truncates_text(engines, model, draft):
    eng = engines.get(model, draft)
    full = eng.generate_batch([PROMPTS[1]], greedy(48))[0]
    stop, i = _stop_string(full.text)
    out = eng.generate_batch([PROMPTS[1]], greedy(48, stop=["\x00never\x00", stop]))[0]
    assert out.text == full.text[:i]
    assert out.finish_reason == "stop" and out.finished
    assert full.token_ids[:len(out.token_ids)] == out.token_ids
    assert len(out.token_ids) < len(full.token_ids)


def test_stop_token_ids(llama):
    full = llama.generate_batch([PROMPTS[0]], greedy(32))[0].token_ids
    tok = full[5]
    first = full.index(tok)
    out = llama.generate_batch([PROMPTS[0]], greedy(32, stop_token_ids=(tok,)))[0]
    assert out.token_ids == full[:first + 1] and out.finish_reason == "stop"


def test_eos_stops_unless_ignored(fresh_engine):
    eng = fresh_engine("tiny-llama")
    full = eng.generate_batch([PROMPTS[2]], greedy(30))[0].token_ids
    fake_eos = full[6]                                   # make a token the model emits act as EOS
    eng.tokenizer.eos_token_id = fake_eos
    stop_at = full.index(fake_eos)
    out = eng.generate_batch([PROMPTS[2]], SamplingParams(max_tokens=30, temperature=0))[0]
    assert out.token_ids == full[:stop_at + 1] and out.finish_reason == "stop"
    out = eng.generate_batch([PROMPTS[2]], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0]
    assert out.token_ids == full and out.finish_reason == "length"


# ----------------------------------------------------------------------------- streaming

@pytest.mark.parametrize("model,draft", [("tiny-llama", "none"), ("tiny-gemma2", "ngram")])
def test_streaming_matches_batch(engines, model, draft):
    eng = engines.get(model, draft)
    sp = greedy(40)
    final = eng.generate_batch([PROMPTS[6]], sp)[0]
    outs = collect(lambda: eng.generate(PROMPTS[6], sp))
    assert outs[-1].finished and not any(o.finished for o in outs[:-1])
    assert outs[-1].text == final.text and outs[-1].token_ids == final.token_ids
    assert "".join(o.delta_text for o in outs) == final.text
    assert [t for o in outs for t in o.delta_token_ids] == final.token_ids
    for a, b in itertools.pairwise(outs):            # cumulative and growing
        assert b.text.startswith(a.text) and b.token_ids[:len(a.token_ids)] == a.token_ids
    assert len(outs) >= 2


@pytest.mark.parametrize("model,draft", [("tiny-llama", "none"), ("tiny-qwen3", "ngram")])
@pytest.mark.parametrize("prompt", [PROMPTS[1], PROMPTS[4]])
def test_streaming_with_stop_string_never_streams_the_stop(engines, model, draft, prompt):
    """Text a stop string later truncates must not have been streamed: deltas add up."""
    eng = engines.get(model, draft)
    full = eng.generate_batch([prompt], greedy(48))[0]
    stop, i = _stop_string(full.text)
    outs = collect(lambda: eng.generate(prompt, greedy(48, stop=stop)))
    assert outs[-1].text == full.text[:i]
    for o in outs:
        assert stop not in o.text and full.text[:i].startswith(o.text)
    assert "".join(o.delta_text for o in outs) == outs[-1].text
    assert outs[-1].finish_reason == "stop"


def test_closing_the_stream_aborts_and_frees_kv(fresh_engine):
    eng = fresh_engine("tiny-llama")

    async def run():
        agen = eng.generate(PROMPTS[0], greedy(1500))
        got = [await agen.__anext__() for _ in range(3)]
        await agen.aclose()
        return got
    got = asyncio.run(run())
    assert not got[-1].finished
    s = wait_idle(eng)
    assert s["num_tokens"] < 1500 and s["num_finished"] == 1
    assert eng.generate_batch([PROMPTS[3]], greedy(5))[0].finish_reason == "length"


def test_cancelling_the_consumer_task_aborts_and_frees_kv(fresh_engine):
    eng = fresh_engine("tiny-llama")
    seen = []

    async def consume():
        async for out in eng.generate(PROMPTS[1], greedy(1500)):
            seen.append(out)

    async def run():
        task = asyncio.create_task(consume())
        while len(seen) < 3:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    asyncio.run(run())
    s = wait_idle(eng)
    assert s["num_tokens"] < 1500


def test_abort_by_request_id(fresh_engine):
    eng = fresh_engine("tiny-llama")
    finals = []
    rid = eng.add_request(PROMPTS[0], greedy(1500), lambda o: o.finished and finals.append(o))
    time.sleep(0.05)
    eng.abort(rid)
    wait_idle(eng)
    assert len(finals) == 1 and finals[0].finish_reason == "abort" and len(finals[0].token_ids) < 1500


# ----------------------------------------------------------------------------- bad input

BAD_PROMPTS = ["", [], [300], [-1], [1, 2, 10 ** 9], None, 12, [1.5, 2.0], [True, False], {"a": 1}]


@pytest.mark.parametrize("prompt", BAD_PROMPTS, ids=repr)
def test_bad_prompt_raises_and_engine_keeps_serving(llama, prompt):
    with pytest.raises(ValueError):
        llama.add_request(prompt, greedy(4))
    with pytest.raises(ValueError):
        collect(lambda: llama.generate(prompt, greedy(4)))
    assert llama.generate_batch([PROMPTS[0]], greedy(4))[0].finish_reason == "length"


def test_bad_params_raise_and_engine_keeps_serving(llama):
    for kw in ({"max_tokens": -1}, {"max_tokens": 10 ** 9}, {"max_tokens": 1.5}, {"temperature": -1},
               {"top_p": 0}, {"top_p": 1.5}, {"top_k": -2}):
        with pytest.raises(ValueError):
            llama.add_request(PROMPTS[0], SamplingParams(**kw))
    with pytest.raises(ValueError):
        llama.add_request(PROMPTS[0], {"max_tokens": 4})
    assert llama.generate_batch([PROMPTS[0]], greedy(3))[0].finish_reason == "length"


def test_prompt_longer_than_context_raises(llama, fresh_engine):
    with pytest.raises(ValueError):
        llama.add_request([5] * 2048, greedy(4))              # tiny presets: 2048 positions
    small = fresh_engine("tiny-llama", kv_tokens=256, block_size=16)
    with pytest.raises(ValueError):
        small.add_request([5] * 250, greedy(4))               # larger than the KV pool allows
    assert small.generate_batch([[5] * 100], greedy(4))[0].finish_reason == "length"
    assert llama.generate_batch([PROMPTS[0]], greedy(3))[0].finish_reason == "length"


def test_unknown_model_and_draft_raise_value_error():
    from aurora import Engine
    with pytest.raises(ModelNotFound):
        Engine(EngineConfig(model="no-such-model-anywhere", draft="none"))
    assert issubclass(ModelNotFound, ValueError)
    with pytest.raises(ValueError):
        EngineConfig(model="tiny-llama", draft="bogus")
    with pytest.raises(ValueError):
        EngineConfig(model="tiny-llama", kv_tokens=4, block_size=16)


def test_generate_batch_with_a_bad_prompt_submits_nothing(fresh_engine):
    eng = fresh_engine("tiny-llama")
    with pytest.raises(ValueError):
        eng.generate_batch([PROMPTS[0], ""], greedy(200))
    time.sleep(0.2)
    assert eng.stats()["num_requests"] == 0


# ----------------------------------------------------------------------------- batching

@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen3", "tiny-gemma2"])
def test_batch_invariance(engines, model):
    eng = engines.get(model)
    sp = greedy(24)
    batch = eng.generate_batch(PROMPTS, sp)
    for prompt, out in zip(PROMPTS, batch):
        assert eng.generate_batch([prompt], sp)[0].token_ids == out.token_ids, prompt


@pytest.mark.parametrize("draft", ["none", "ngram"])
def test_preemption_with_tiny_kv_pool(engines, fresh_engine, draft):
    """16 blocks of 16 tokens for 8 requests of 60 tokens: the scheduler must preempt and
    recompute, and every output must equal the request run alone."""
    ref = engines.get("tiny-llama")
    sp = greedy(60)
    alone = [ref.generate_batch([p], sp)[0].token_ids for p in PROMPTS]
    eng = fresh_engine("tiny-llama", draft, kv_tokens=256, block_size=16, max_batch=8)
    outs = eng.generate_batch(PROMPTS, sp, timeout=120)
    assert [o.token_ids for o in outs] == alone
    assert all(o.finish_reason == "length" for o in outs)
    s = wait_idle(eng)
    assert s["num_preemptions"] > 0
    assert s["num_preemptions"] == sum(o.stats["num_preemptions"] for o in outs)
    assert s["num_finished"] == len(PROMPTS) and s["num_errors"] == 0


def test_requests_joining_mid_flight(engines, staggered):
    eng = engines.get("tiny-qwen3")
    sp = [greedy(40)] * 3 + [greedy(12)] * 5
    alone = [eng.generate_batch([p], s)[0].token_ids for p, s in zip(PROMPTS, sp)]
    outs, events = staggered(eng, PROMPTS, sp, num_first=3)
    assert [o.token_ids for o in outs] == alone
    # at least one late request started before an early one finished: they really overlapped
    first_late = min(events.index((i, "first")) for i in range(3, len(PROMPTS)))
    assert any(events.index((i, "finish")) > first_late for i in range(3))


def test_lone_request_outgrowing_the_pool_ends_with_length(fresh_engine):
    eng = fresh_engine("tiny-llama", kv_tokens=128, block_size=16)
    out = eng.generate_batch([[7] * 40], greedy(500), timeout=120)[0]
    assert out.finish_reason == "length" and 0 < len(out.token_ids) < 128
    wait_idle(eng)


# ----------------------------------------------------------------------------- stats

def test_request_stats_plain_decoding(fresh_engine):
    eng = fresh_engine("tiny-llama")
    outs = eng.generate_batch(PROMPTS[:4], greedy(17))
    for o in outs:
        st = o.stats
        for key in ("num_tokens", "num_steps", "accepted_length", "draft_version"):
            assert key in st
        assert st["num_tokens"] == len(o.token_ids) == 17
        assert st["accepted_length"] == 1.0 and st["draft_version"] == 0
        assert st["num_prompt_tokens"] == len(o.prompt_token_ids)
    assert [o.stats["num_steps"] for o in outs if len(o.prompt_token_ids) > 1] == [16] * 3
    s = wait_idle(eng)
    assert s["num_tokens"] == 4 * 17 and s["num_requests"] == s["num_finished"] == 4
    assert s["accepted_length"] == 1.0 and s["tokens_per_s"] > 0


def test_request_stats_single_token_prompt(llama):
    out = llama.generate_batch(["x"], greedy(10))[0]
    assert out.stats["num_steps"] == 9


def test_stats_with_speculation(fresh_engine):
    spec = SpecConfig(depth=4)
    eng = fresh_engine("tiny-gemma2", "ngram", spec=spec)
    outs = eng.generate_batch(PROMPTS[:4], greedy(40))
    for o in outs:
        st = o.stats
        assert st["num_tokens"] == 40
        assert st["accepted_length"] > 1.0
        assert st["num_steps"] < 39                           # fewer target steps than tokens
        assert st["accepted_length"] * st["num_steps"] >= 39 - 1e-9
        assert isinstance(st["draft_version"], int)
    s = wait_idle(eng)
    for key in ("accepted_length", "acceptance_by_depth", "tokens_per_s", "draft_version"):
        assert key in s
    assert s["accepted_length"] > 1.0 and s["tokens_per_s"] > 0 and isinstance(s["draft_version"], int)
    by_depth = s["acceptance_by_depth"]
    assert by_depth and set(by_depth) <= set(range(1, spec.depth + 1))
    assert all(0.0 <= v <= 1.0 for v in by_depth.values()) and by_depth[1] > 0
    assert s["num_tokens"] == sum(len(o.token_ids) for o in outs)


# ----------------------------------------------------------------------------- more properties

@pytest.mark.parametrize("draft", ["none", "ngram"])
def test_top_k_one_and_tiny_temperature_are_greedy(engines, draft):
    eng = engines.get("tiny-qwen3", draft)
    want = [o.token_ids for o in eng.generate_batch(PROMPTS, greedy(30))]
    top1 = eng.generate_batch(PROMPTS, [SamplingParams(max_tokens=30, temperature=1.3, top_k=1, seed=i,
                                                       ignore_eos=True) for i in range(len(PROMPTS))])
    cold = eng.generate_batch(PROMPTS, SamplingParams(max_tokens=30, temperature=1e-7, ignore_eos=True))
    assert [o.token_ids for o in top1] == want
    assert [o.token_ids for o in cold] == want


def test_speculative_sampling_same_seed_same_output(engines):
    eng = engines.get("tiny-gemma2", "ngram")
    sp = [SamplingParams(max_tokens=30, temperature=2.0, top_p=0.9, seed=i, ignore_eos=True) for i in range(4)]
    a = eng.generate_batch(PROMPTS[:4], sp)
    b = eng.generate_batch(PROMPTS[:4], sp)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert len({tuple(o.token_ids) for o in a}) > 1


def test_seeded_sampling_survives_preemption(engines, fresh_engine):
    """Without a draft every token costs one draw, so recomputation after preemption must not
    change a seeded request's sample."""
    sp = [SamplingParams(max_tokens=60, temperature=1.0, seed=i, ignore_eos=True) for i in range(len(PROMPTS))]
    ref = engines.get("tiny-llama")
    alone = [ref.generate_batch([p], s)[0].token_ids for p, s in zip(PROMPTS, sp)]
    eng = fresh_engine("tiny-llama", kv_tokens=256, block_size=16, max_batch=8)
    outs = eng.generate_batch(PROMPTS, sp, timeout=120)
    assert [o.token_ids for o in outs] == alone
    assert wait_idle(eng)["num_preemptions"] > 0


def test_prompt_at_the_pool_limit_completes(fresh_engine):
    eng = fresh_engine("tiny-llama", kv_tokens=256, block_size=16)
    limit = 256 - eng.policy.budget - 16
    with pytest.raises(ValueError):
        eng.add_request([7] * (limit + 1), greedy(4))
    out = eng.generate_batch([[7] * limit], greedy(100), timeout=120)[0]
    # every token but the last needs a KV slot: at most 256 cached + 1 pending
    assert out.finish_reason == "length" and 0 < len(out.token_ids) <= 256 - limit + 1
    wait_idle(eng)


def test_close_aborts_running_requests(fresh_engine):
    eng = fresh_engine("tiny-llama")
    finals = []
    eng.add_request(PROMPTS[0], greedy(1500), lambda o: o.finished and finals.append(o))
    while eng.stats()["num_tokens"] < 3:
        time.sleep(0.005)
    eng.close()
    assert len(finals) == 1 and finals[0].finish_reason == "abort"
    with pytest.raises(RuntimeError):
        eng.add_request(PROMPTS[0], greedy(4))


def test_failing_callback_aborts_only_its_request(fresh_engine):
    eng = fresh_engine("tiny-llama")

    def bad(out):
        raise RuntimeError("client went away")
    eng.add_request(PROMPTS[0], greedy(500), bad)
    outs = eng.generate_batch(PROMPTS[1:4], greedy(20))
    assert all(o.finish_reason == "length" and len(o.token_ids) == 20 for o in outs)
    s = wait_idle(eng)
    assert s["num_finished"] == 4 and s["num_tokens"] < 500


def test_concurrent_submitters(llama):
    import threading
    sp = greedy(16)
    want = [o.token_ids for o in llama.generate_batch(PROMPTS, sp)]
    got: dict[int, list[int]] = {}

    def worker(idx):
        for i in idx:
            got[i] = llama.generate_batch([PROMPTS[i]], sp)[0].token_ids
    threads = [threading.Thread(target=worker, args=(range(k, len(PROMPTS), 4),)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [got[i] for i in range(len(PROMPTS))] == want


def test_chat_uses_the_template(llama):
    messages = [{"role": "user", "content": "hi"}]
    ids = llama.chat_prompt(messages)
    assert ids == llama.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    out = llama.chat(messages, greedy(8))
    assert out.prompt_token_ids == ids and len(out.token_ids) == 8
    for bad in ([], [{"role": "user"}], "hi", [{"role": 1, "content": "x"}]):
        with pytest.raises(ValueError):
            llama.chat_prompt(bad)


# ----------------------------------------------------------------------------- incremental detokenisation

DETOK_TEXT = "Héllo wörld! naïve café — 日本語のテキスト 🙂🚀 done.\n\tdef f(x): return x ** 2  # ok"


def _stream_detok(tokenizer, ids: list[int], chunk_sizes: list[int]):
    from aurora.engine.detok import detokenize
    from aurora.engine.sequence import Sequence
    seq = Sequence("d", [5], SamplingParams(), None)
    texts, i, k = [], 0, 0
    while i < len(ids):
        n = chunk_sizes[k % len(chunk_sizes)]
        seq.token_ids += ids[i:i + n]
        i, k = i + n, k + 1
        texts.append(detokenize(tokenizer, seq, final=i >= len(ids)))
    return texts


@pytest.mark.parametrize("chunks", [[1], [2, 1, 3], [5]])
def test_incremental_detokenisation_equals_full_decode_bytes(chunks):
    """Byte-level ids split multi-byte characters: partial characters are held back, never
    streamed as U+FFFD, and the final text equals one full decode."""
    from aurora.models.tokenizer import ByteTokenizer
    tok = ByteTokenizer()
    ids = tok.encode(DETOK_TEXT)
    texts = _stream_detok(tok, ids, chunks)
    assert texts[-1] == tok.decode(ids)
    for a, b in zip(texts, texts[1:]):
        assert b.startswith(a) and "\ufffd" not in a


@pytest.mark.slow
@pytest.mark.parametrize("chunks", [[1], [3, 1, 2]])
def test_incremental_detokenisation_equals_full_decode_real_tokenizer(chunks):
    from aurora.bench.systems import load_tokenizer
    tok = load_tokenizer("smollm2-135m")
    ids = tok.encode(DETOK_TEXT, add_special_tokens=False)
    texts = _stream_detok(tok, ids, chunks)
    assert texts[-1] == tok.decode(ids, skip_special_tokens=True)
    for a, b in zip(texts, texts[1:]):
        assert b.startswith(a) and "\ufffd" not in a


# ----------------------------------------------------------------------------- chunked prefill

def test_chunked_prefill_keeps_decoding_and_matches_whole_prefill(fresh_engine):
    """A long prompt arriving while another stream decodes is prefilled in chunks, the other
    stream decoding in the same steps, and greedy outputs equal unchunked prefill."""
    import threading
    prompts = [[(i * 37) % 200 + 3 for i in range(12)], [(i * 53) % 200 + 3 for i in range(150)]]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    whole = fresh_engine("tiny-llama", draft="none", prefill_chunk=0).generate_batch(prompts, params)
    eng = fresh_engine("tiny-llama", draft="none", prefill_chunk=16)
    chunks = []
    orig = eng.runner.forward

    def forward(batch):
        n_new = (batch.query_start[1:] - batch.query_start[:-1]).tolist()
        if len(n_new) == 2 and n_new[1] > 1:                  # long prompt beside the decoding stream
            chunks.append(n_new)
        return orig(batch)
    eng.runner.forward = forward
    started, done, final = threading.Event(), threading.Event(), {}

    def on_short(out):
        started.set()
        if out.finished:
            final["short"] = out
            done.set()
    eng.add_request(prompts[0], params, on_short)
    assert started.wait(30)
    long_out = eng.generate_batch([prompts[1]], params, timeout=60)[0]
    assert done.wait(60)
    assert long_out.token_ids == whole[1].token_ids
    assert final["short"].token_ids == whole[0].token_ids
    assert len(chunks) >= 150 // 16 - 1                        # chunked over many steps ...
    assert all(short == 1 and chunk <= 16 for short, chunk in chunks)   # ... each with a decode row


# ----------------------------------------------------------------------------- one compute thread

def test_the_worker_thread_loads_compiles_and_serves(fresh_engine, monkeypatch):
    """Loading, the runner, the draft and serving all run on the engine's worker thread: the
    caller's thread computes nothing, so the process keeps one OpenMP pool (see Engine)."""
    import threading

    import aurora.engine.engine as engine_mod
    seen = []
    real_load = engine_mod.load_model

    def load(*args, **kwargs):
        seen.append(threading.current_thread().name)
        return real_load(*args, **kwargs)
    monkeypatch.setattr(engine_mod, "load_model", load)
    eng = fresh_engine()
    real_forward = eng.runner.forward

    def forward(batch):
        seen.append(threading.current_thread().name)
        return real_forward(batch)
    eng.runner.forward = forward
    eng.generate_batch(PROMPTS[:2], greedy(4))
    assert seen and set(seen) == {"aurora-engine"}


def test_run_on_worker_returns_raises_and_fails_after_close(fresh_engine):
    import threading
    eng = fresh_engine()
    assert eng.run_on_worker(lambda a, b: (a + b, threading.current_thread().name), 2, 3) == (5, "aurora-engine")
    with pytest.raises(ZeroDivisionError):
        eng.run_on_worker(lambda: 1 / 0)
    assert eng.generate_batch(["hello"], greedy(3))[0].token_ids      # a failing call costs nothing
    eng.close()
    with pytest.raises(RuntimeError, match="closed"):
        eng.run_on_worker(lambda: None)


def test_a_failing_boot_raises_in_the_caller():
    from aurora import Engine
    with pytest.raises(ValueError, match="draft"):
        Engine(EngineConfig(model="tiny-llama", draft="model:no-such-draft-model"))
