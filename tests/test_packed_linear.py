"""Linear weights packed once for oneDNN (aurora/models/packed_linear.py): the packed product equals
`F.linear` bit for bit, what gets wrapped (every bf16 CPU linear, LM head included; nothing past the
byte budget, in fp32 or where the timing says it does not pay), when a call falls back to
`F.linear` (autograd, `plain_linears`, long prompts' rows), and the engine knob."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aurora import Engine, EngineConfig, SamplingParams, SpecConfig
from aurora.models.packed_linear import PackedLinear, pack_linears, plain_linears
from aurora.models.presets import build


def _linear(bias: bool = True, d_in: int = 48, d_out: int = 40) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(d_in, d_out, bias=bias).to(torch.bfloat16)


@pytest.mark.parametrize("bias", [False, True])
def test_packed_product_equals_f_linear(bias):
    lin = _linear(bias, 576, 1536)
    w, b = lin.weight.detach(), None if lin.bias is None else lin.bias.detach()
    wrapped = PackedLinear(lin)
    assert wrapped.weight is lin.weight                           # the model's parameter, not a copy
    with torch.inference_mode():
        for shape in [(1, 576), (3, 576), (8, 576), (1, 5, 576), (2, 3, 576), (300, 576)]:
            x = torch.randn(shape).to(torch.bfloat16)
            y = wrapped(x)
            assert y.shape == (*shape[:-1], 1536)
            assert torch.equal(y, F.linear(x, w, b)), shape


def test_autograd_and_plain_linears_take_f_linear(monkeypatch):
    import aurora.models.packed_linear as pl
    wrapped = PackedLinear(_linear())
    calls = []
    real = pl._packed_product
    monkeypatch.setattr(pl, "_packed_product", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(4, 48).to(torch.bfloat16)
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
        y = wrapped(torch.randn(1, pl.PLAIN_FROM_ROWS, 48).to(torch.bfloat16))
        assert y.shape == (1, pl.PLAIN_FROM_ROWS, 40) and len(calls) == 2
        wrapped(torch.randn(pl.PLAIN_FROM_ROWS - 1, 48).to(torch.bfloat16))
    assert len(calls) == 3


def test_pack_linears_wraps_every_bf16_linear_within_budget():
    model, _ = build("tiny-llama", torch.bfloat16, torch.device("cpu"))
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    expect = sum(2 * m.weight.numel() for m in linears)
    assert pack_linears(model, calibrate=False) == expect
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert isinstance(model.get_output_embeddings(), PackedLinear)        # the LM head too

    small, _ = build("tiny-llama", torch.bfloat16, torch.device("cpu"))
    assert pack_linears(small, budget_bytes=expect - 1, calibrate=False) == 0   # over budget: as it is
    assert not any(isinstance(m, PackedLinear) for m in small.modules())
    fp32, _ = build("tiny-llama", torch.float32, torch.device("cpu"))
    assert pack_linears(fp32, calibrate=False) == 0               # only bf16 weights are wrapped


def test_calibration_wraps_only_where_packing_is_clearly_faster(monkeypatch):
    import aurora.models.packed_linear as pl
    for ratios, wrapped in [([0.5, 0.6], True), ([0.85, 0.96], True), ([0.9, 1.0], False), ([1.3, 1.2], False)]:
        model, _ = build("tiny-llama", torch.bfloat16, torch.device("cpu"))
        monkeypatch.setattr(pl, "packed_time_ratio", lambda layers, r=ratios: list(r))
        assert (pack_linears(model) > 0) == wrapped
        assert any(isinstance(m, PackedLinear) for m in model.modules()) == wrapped

    def missing(layers):
        raise RuntimeError("No such operator mkldnn::_reorder_linear_weight")
    monkeypatch.setattr(pl, "packed_time_ratio", missing)         # a torch without the oneDNN ops
    model, _ = build("tiny-llama", torch.bfloat16, torch.device("cpu"))
    assert pack_linears(model) == 0
    monkeypatch.undo()
    layers = [PackedLinear(_linear()), PackedLinear(_linear(False, 40, 64))]
    ratios = pl.packed_time_ratio(layers, (1, 3), passes=3)      # the real timing: one per row count
    assert len(ratios) == 2 and all(0 < r < float("inf") for r in ratios)
    assert all(m.active for m in layers)                          # left serving from the packed copies


def test_engine_knob():
    greedy = SamplingParams(max_tokens=8, temperature=0)
    outs = {}
    for on in (False, True):
        with Engine(EngineConfig(model="tiny-llama", draft="ngram", online=False, dtype="bfloat16",
                                 packed_linears=on)) as eng:
            wrapped = [m for m in eng.runner.model.modules() if isinstance(m, PackedLinear)]
            assert (eng.stats()["packed_linear_bytes"] > 0) == bool(wrapped)   # on where this CPU gains
            assert on or not wrapped
            outs[on] = [o.token_ids for o in eng.generate_batch(["hello hello ", "def f(x):"], greedy)]
            assert all(len(t) == 8 for t in outs[on])
    assert outs[True] == outs[False]                              # the same products, the same tokens
    with Engine(EngineConfig(model="tiny-llama", draft="none", online=False, dtype="float32")) as eng:
        assert eng.stats()["packed_linear_bytes"] == 0            # fp32 engines are never wrapped


def test_a_weight_written_in_place_is_repacked_at_its_next_call():
    lin = _linear(True, 64, 32)
    wrapped = PackedLinear(lin)
    x = torch.randn(5, 64).to(torch.bfloat16)
    with torch.inference_mode():
        before = wrapped(x)
    with torch.no_grad():                                         # a hot swap: copy_ into the serving slot
        lin.weight.copy_(torch.randn(32, 64).to(torch.bfloat16))
    with torch.inference_mode():
        after = wrapped(x)
    assert not torch.equal(before, after)
    assert torch.equal(after, F.linear(x, lin.weight, lin.bias))


def test_a_fused_gemm_is_repacked_when_one_of_its_weights_is_written():
    """FusedPacked (q/k/v of a learned draft's serving slot): a hot swap writes the weights in
    place; the next call must compute from the new ones."""
    from aurora.models.packed_linear import FusedPacked
    layers = [PackedLinear(_linear(False, 64, d)) for d in (32, 16, 16)]
    fused = FusedPacked(layers, track_writes=True)
    x = torch.randn(3, 64).to(torch.bfloat16)
    with torch.no_grad():
        layers[1].weight.copy_(torch.randn(16, 64).to(torch.bfloat16))
    with torch.inference_mode():
        y = fused(x)
    assert torch.equal(y, torch.cat([F.linear(x, m.weight) for m in layers], -1))


def test_learned_draft_serves_from_packed_slots_and_swaps_into_them(monkeypatch):
    """An eagle draft on a bf16 CPU engine packs its serving slots at its first proposal; its
    proposals equal those of the same engine unpacked, before and after a hot swap of new weights
    (a stale packed copy would keep proposing from the old weights)."""
    import aurora.models.packed_linear as pl
    from aurora.flywheel.weights import publish
    monkeypatch.setattr(pl, "packed_time_ratio", lambda layers: [0.5, 0.5])   # as on a CPU where it pays
    greedy = SamplingParams(max_tokens=12, temperature=0)
    prompts = ["hello hello hello ", "def f(x): return x"]
    tokens = {}
    for on in (False, True):
        with Engine(EngineConfig(model="tiny-llama", draft="eagle", online=False, dtype="bfloat16",
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
            donor = type(slots[0]).from_config(slots[0].config_dict()).to(torch.bfloat16)
            eng.run_on_worker(publish, eng.proposer, donor, 1)     # the hot swap: the inactive slot ...
            assert eng.run_on_worker(eng.proposer.flip)               # ... then the flip (the flywheel's hook)
            before = len(proposed)
            tokens[on] = first, [eng.generate_batch([p], greedy)[0].token_ids for p in prompts], proposed
            assert eng.proposer.version == 1
            assert len(proposed) > before and any(t for step in proposed[before:] for t in step)
    assert tokens[True] == tokens[False]
