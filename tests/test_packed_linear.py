"""Linear weights packed once for oneDNN (aurora/models/packed_linear.py): the packed product equals
`F.linear` (bit for bit in bf16, to rounding in fp32) and gives every row the same bits whatever
the row count, what gets wrapped (every bf16 or fp32 CPU linear, LM head included; nothing past the
byte budget, in fp16 or where the timing says it does not pay), when a call falls back to
`F.linear` (autograd, `plain_linears`, long prompts' rows), and the engine knob. bf16 cases skip
on a CPU whose oneDNN cannot pack bf16 (AVX2 only)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aurora import Engine, EngineConfig, SamplingParams, SpecConfig
from aurora.models.packed_linear import PackedLinear, pack_linears, packing_supported, plain_linears
from aurora.models.presets import build

needs_bf16_packing = pytest.mark.skipif(not packing_supported(torch.bfloat16),
                                        reason="this CPU's oneDNN cannot pack bf16 weights")
DTYPES = [pytest.param(torch.bfloat16, marks=needs_bf16_packing, id="bf16"), pytest.param(torch.float32, id="fp32")]


def _linear(bias: bool = True, d_in: int = 48, d_out: int = 40, dtype=torch.bfloat16) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(d_in, d_out, bias=bias).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_packed_product_equals_f_linear(bias, dtype):
    lin = _linear(bias, 576, 1536, dtype)
    w, b = lin.weight.detach(), None if lin.bias is None else lin.bias.detach()
    wrapped = PackedLinear(lin)
    assert wrapped.weight is lin.weight                           # the model's parameter, not a copy
    with torch.inference_mode():
        for shape in [(1, 576), (3, 576), (8, 576), (1, 5, 576), (2, 3, 576), (300, 576)]:
            x = torch.randn(shape).to(dtype)
            y = wrapped(x)
            assert y.shape == (*shape[:-1], 1536)
            if dtype == torch.bfloat16:
                assert torch.equal(y, F.linear(x, w, b)), shape
            else:                                                 # fp32: another summation order
                torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_row_gets_the_same_bits_at_any_row_count(dtype):
    """What greedy exactness rests on: a row's product does not depend on how many rows share the
    call (a verify step of 17 rows vs a plain decode of 1). Plain `F.linear` in fp32 does not
    have this property on every CPU (its one-row path is another kernel)."""
    wrapped = PackedLinear(_linear(True, 576, 1536, dtype))
    x = torch.randn(17, 576).to(dtype)                            # [17 rows, in]
    with torch.inference_mode():
        whole = wrapped(x)
        for n in (1, 3, 8):
            parts = torch.cat([wrapped(x[i:i + n]) for i in range(0, 17, n)])
            assert torch.equal(parts, whole), n


@pytest.mark.parametrize("dtype", DTYPES)
def test_autograd_and_plain_linears_take_f_linear(monkeypatch, dtype):
    import aurora.models.packed_linear as pl
    wrapped = PackedLinear(_linear(dtype=dtype))
    calls = []
    real = pl._packed_product
    monkeypatch.setattr(pl, "_packed_product", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(4, 48).to(dtype)
    with torch.no_grad():
        wrapped(x)
    assert len(calls) == 1                                        # serving: the packed copy
    xg = x.clone().requires_grad_(True)
    wrapped(xg).float().sum().backward()                          # training through it: autograd works
    assert len(calls) == 1 and xg.grad is not None
    model = nn.Sequential(wrapped)
    with plain_linears(model), torch.no_grad():                   # e.g. transformers as a baseline
        model(x)
    assert len(calls) == 1
    with torch.no_grad():
        model(x)
    assert len(calls) == 2                                        # back on after the context
    with torch.no_grad():                                         # a long prompt's rows: plain GEMM
        y = wrapped(torch.randn(1, pl.PLAIN_FROM_ROWS, 48).to(dtype))
        assert y.shape == (1, pl.PLAIN_FROM_ROWS, 40) and len(calls) == 2
        wrapped(torch.randn(pl.PLAIN_FROM_ROWS - 1, 48).to(dtype))
    assert len(calls) == 3


@pytest.mark.parametrize("dtype", DTYPES)
def test_pack_linears_wraps_every_linear_within_budget(dtype):
    model, _ = build("tiny-llama", dtype, torch.device("cpu"))
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    expect = sum(m.weight.element_size() * m.weight.numel() for m in linears)
    assert pack_linears(model, calibrate=False) == expect
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert isinstance(model.get_output_embeddings(), PackedLinear)        # the LM head too

    small, _ = build("tiny-llama", dtype, torch.device("cpu"))
    assert pack_linears(small, budget_bytes=expect - 1, calibrate=False) == 0   # over budget: as it is
    assert not any(isinstance(m, PackedLinear) for m in small.modules())
    fp16, _ = build("tiny-llama", torch.float16, torch.device("cpu"))
    assert pack_linears(fp16, calibrate=False) == 0               # only bf16 and fp32 weights are wrapped


def test_calibration_wraps_only_where_packing_is_clearly_faster(monkeypatch):
    import aurora.models.packed_linear as pl
    for ratios, wrapped in [([0.5, 0.6], True), ([0.85, 0.96], True), ([0.9, 1.0], False), ([1.3, 1.2], False)]:
        model, _ = build("tiny-llama", torch.float32, torch.device("cpu"))
        monkeypatch.setattr(pl, "packed_time_ratio", lambda layers, r=ratios: list(r))
        monkeypatch.setattr(pl, "_DECISIONS", {})
        assert (pack_linears(model) > 0) == wrapped
        assert any(isinstance(m, PackedLinear) for m in model.modules()) == wrapped

    # timed once per process and shapes; an ambiguous timing is repeated (median of the means)
    timings = iter([[1.18, 0.72], [0.80, 0.70], [0.9, 0.9], [2.0, 2.0]])
    calls = []
    monkeypatch.setattr(pl, "packed_time_ratio", lambda layers: calls.append(1) or next(timings))
    monkeypatch.setattr(pl, "_DECISIONS", {})
    for _ in range(3):                                            # three engines' loads, one decision
        model, _ = build("tiny-llama", torch.float32, torch.device("cpu"))
        assert pack_linears(model) > 0                            # means 0.95, 0.75: clear -> median 0.85
    assert len(calls) == 2
    monkeypatch.setattr(pl, "_DECISIONS", {})
    model, _ = build("tiny-llama", torch.float32, torch.device("cpu"))
    assert pack_linears(model) == 0                               # 0.9 then 2.0: median 1.45
    assert len(calls) == 4
    monkeypatch.setattr(pl, "_DECISIONS", {})

    def missing(layers):
        raise RuntimeError("No such operator mkldnn::_reorder_linear_weight")
    monkeypatch.setattr(pl, "packed_time_ratio", missing)         # a torch without the oneDNN ops
    model, _ = build("tiny-llama", torch.float32, torch.device("cpu"))
    assert pack_linears(model) == 0
    monkeypatch.undo()
    layers = [PackedLinear(_linear(dtype=torch.float32)), PackedLinear(_linear(False, 40, 64, torch.float32))]
    ratios = pl.packed_time_ratio(layers, (1, 3), passes=3)      # the real timing: one per row count
    assert len(ratios) == 2 and all(0 < r < float("inf") for r in ratios)
    assert all(m.active for m in layers)                          # left serving from the packed copies


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_engine_knob(dtype):
    greedy = SamplingParams(max_tokens=8, temperature=0)
    outs = {}
    for on in (False, True):
        with Engine(EngineConfig(model="tiny-llama", draft="ngram", online=False, dtype=dtype,
                                 packed_linears=on)) as eng:
            wrapped = [m for m in eng.runner.model.modules() if isinstance(m, PackedLinear)]
            assert (eng.stats()["packed_linear_bytes"] > 0) == bool(wrapped)   # on where this CPU gains
            assert on or not wrapped
            outs[on] = [o.token_ids for o in eng.generate_batch(["hello hello ", "def f(x):"], greedy)]
            assert all(len(t) == 8 for t in outs[on])
    assert outs[True] == outs[False]           # bf16: the same products; fp32: within rounding, no tie here
    with Engine(EngineConfig(model="tiny-llama", draft="none", online=False, dtype="float16")) as eng:
        assert eng.stats()["packed_linear_bytes"] == 0            # fp16 engines are never wrapped


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_weight_written_in_place_is_repacked_at_its_next_call(dtype):
    lin = _linear(True, 64, 32, dtype)
    wrapped = PackedLinear(lin)
    x = torch.randn(5, 64).to(dtype)
    with torch.inference_mode():
        before = wrapped(x)
    with torch.no_grad():                                         # a hot swap: copy_ into the serving slot
        lin.weight.copy_(torch.randn(32, 64).to(dtype))
    with torch.inference_mode():
        after = wrapped(x)
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_fused_gemm_is_repacked_when_one_of_its_weights_is_written(dtype):
    """FusedPacked (q/k/v of a learned draft's serving slot): a hot swap writes the weights in
    place; the next call must compute from the new ones."""
    from aurora.models.packed_linear import FusedPacked
    layers = [PackedLinear(_linear(False, 64, d, dtype)) for d in (32, 16, 16)]
    fused = FusedPacked(layers, track_writes=True)
    x = torch.randn(3, 64).to(dtype)
    with torch.no_grad():
        layers[1].weight.copy_(torch.randn(16, 64).to(dtype))
    with torch.inference_mode():
        y = fused(x)
    torch.testing.assert_close(y, torch.cat([F.linear(x, m.weight) for m in layers], -1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [pytest.param("bfloat16", marks=needs_bf16_packing), "float32"])
def test_learned_draft_serves_from_packed_slots_and_swaps_into_them(monkeypatch, dtype):
    """An eagle draft on a bf16 or fp32 CPU engine packs its serving slots at its first proposal; its
    proposals equal those of the same engine unpacked, before and after a hot swap of new weights
    (a stale packed copy would keep proposing from the old weights)."""
    import aurora.models.packed_linear as pl
    from aurora.flywheel.weights import publish
    monkeypatch.setattr(pl, "packed_time_ratio", lambda layers: [0.5, 0.5])   # as on a CPU where it pays
    monkeypatch.setattr(pl, "_DECISIONS", {})
    greedy = SamplingParams(max_tokens=12, temperature=0)
    prompts = ["hello hello hello ", "def f(x): return x"]
    tokens = {}
    for on in (False, True):
        with Engine(EngineConfig(model="tiny-llama", draft="eagle", online=False, dtype=dtype,
                                 packed_linears=on, spec=SpecConfig(adaptive=False))) as eng:   # no timing
            proposed, real = [], eng.proposer.propose

            def recording(seqs, ctx, real=real, proposed=proposed):
                trees = real(seqs, ctx)
                proposed.append([list(t.token_ids) for t in trees])
                return trees
            eng.proposer.propose = recording
            first = [eng.generate_batch([p], greedy)[0].token_ids for p in prompts]   # one at a time:
            # steps (and so proposals) do not depend on when the second request reached the engine
            slots = eng.proposer.slots
            assert all(isinstance(m, PackedLinear) for s in slots for m in (s.fc, s.lm_head)) == on
            assert all(s._qkv is not None and s._gate_up is not None for s in slots) == on   # fused GEMMs
            torch.manual_seed(1)
            donor = type(slots[0]).from_config(slots[0].config_dict()).to(getattr(torch, dtype))
            eng.run_on_worker(publish, eng.proposer, donor, 1)     # the hot swap: the inactive slot ...
            assert eng.run_on_worker(eng.proposer.flip)               # ... then the flip (the flywheel's hook)
            before = len(proposed)
            tokens[on] = first, [eng.generate_batch([p], greedy)[0].token_ids for p in prompts], proposed
            assert eng.proposer.version == 1
            assert len(proposed) > before and any(t for step in proposed[before:] for t in step)
    assert tokens[True] == tokens[False]


@pytest.mark.exactness
@pytest.mark.parametrize("draft", ["suffix", "suffix+ngram"])
def test_fp32_packed_speculative_greedy_equals_plain_greedy(monkeypatch, draft):
    """fp32 with the packed GEMMs forced on (as on a CPU where the load-time timing says they
    pay, e.g. AVX2-only): speculative greedy verifies trees of many rows per step, plain greedy
    one row; the tokens must be the same. Each prompt is served twice, so the second time the
    suffix memory proposes (and verification accepts) long runs."""
    import aurora.models.packed_linear as pl
    monkeypatch.setattr(pl, "packed_time_ratio", lambda layers: [0.5, 0.5])
    monkeypatch.setattr(pl, "_DECISIONS", {})
    greedy = SamplingParams(max_tokens=32, temperature=0)
    prompts = ["hello hello hello hello ", "def f(x):\n    return x + 1\n\ndef f(x):\n",
               "the cat sat on the mat. the cat sat on", "1 2 3 4 1 2 3 4 1 2"]
    outs, tau = {}, {}
    for d in ("none", draft):
        with Engine(EngineConfig(model="tiny-llama", draft=d, online=False, dtype="float32",
                                 spec=SpecConfig(adaptive=False))) as eng:
            assert eng.stats()["packed_linear_bytes"] > 0 and eng.runner.fast is not None
            assert not any(type(m) is nn.Linear for m in eng.runner.model.modules())   # all packed
            outs[d] = [[o.token_ids for o in eng.generate_batch(prompts, greedy)] for _ in range(2)]
            tau[d] = eng.stats()["accepted_length"]
    assert outs[draft] == outs["none"]
    assert outs["none"][0] == outs["none"][1] and all(len(t) == 32 for t in outs["none"][0])
    assert tau[draft] > 1.5                                       # many-row verify steps were accepted
