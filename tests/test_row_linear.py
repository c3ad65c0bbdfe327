"""Few-row linear calls on fp32 weight copies (aurora/models/row_linear.py): which path a call
takes by its row count, what gets wrapped (decoder linears of a bf16 CPU model, never the LM
head, nothing past the byte budget or in fp32), and the engine knob that turns it on."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aurora import Engine, EngineConfig, SamplingParams
from aurora.models.presets import build
from aurora.models.row_linear import RowAdaptiveLinear, adapt_linears, plain_linears


def _linear(bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(48, 40, bias=bias).to(torch.bfloat16)


@pytest.mark.parametrize("bias", [False, True])
def test_few_rows_use_the_fp32_copy_and_more_rows_the_bf16_weight(bias):
    lin = _linear(bias)
    w, b = lin.weight.detach(), None if lin.bias is None else lin.bias.detach()
    wrapped = RowAdaptiveLinear(lin, max_rows=3)
    for shape in [(1, 48), (3, 48), (1, 3, 48)]:                 # <= 3 rows, flat or batched
        x = torch.randn(shape).to(torch.bfloat16)
        fp32 = F.linear(x.float(), w.float(), None if b is None else b.float()).to(torch.bfloat16)
        assert torch.equal(wrapped(x), fp32)
    for shape in [(4, 48), (2, 2, 48), (64, 48)]:                # > 3 rows: the model's own GEMM
        x = torch.randn(shape).to(torch.bfloat16)
        assert torch.equal(wrapped(x), F.linear(x, w, b))
    assert wrapped.weight is lin.weight                           # the model's parameter, not a copy


def test_adapt_linears_wraps_decoder_layers_but_not_the_lm_head():
    model, _ = build("tiny-llama", torch.bfloat16, torch.device("cpu"))
    head = model.get_output_embeddings()
    linears = [m for m in model.modules() if type(m) is nn.Linear and m is not head]
    expect = sum(4 * m.weight.numel() for m in linears)
    assert adapt_linears(model, 3, skip=(head,), calibrate=False) == expect
    wrapped = [m for m in model.modules() if isinstance(m, RowAdaptiveLinear)]
    assert len(wrapped) == len(linears) > 0 and type(model.get_output_embeddings()) is nn.Linear
    with plain_linears(model):                                    # e.g. transformers as a baseline
        assert all(m.max_rows == 0 for m in wrapped)
    assert all(m.max_rows == 3 for m in wrapped)

    small, _ = build("tiny-llama", torch.bfloat16, torch.device("cpu"))
    assert adapt_linears(small, 3, budget_bytes=expect - 1, calibrate=False) == 0   # over budget: as it is
    assert not any(isinstance(m, RowAdaptiveLinear) for m in small.modules())
    fp32, _ = build("tiny-llama", torch.float32, torch.device("cpu"))
    assert adapt_linears(fp32, 3, calibrate=False) == 0           # only bf16 weights are wrapped


def test_calibration_wraps_only_where_fp32_is_clearly_faster(monkeypatch):
    import aurora.models.row_linear as rl
    for ratio, wrapped in [(0.5, True), (0.84, True), (0.9, False), (1.3, False)]:
        model, _ = build("tiny-llama", torch.bfloat16, torch.device("cpu"))
        monkeypatch.setattr(rl, "fp32_time_ratio", lambda weight, rows, r=ratio: [r for _ in rows])
        assert (adapt_linears(model, 3) > 0) == wrapped
        assert any(isinstance(m, RowAdaptiveLinear) for m in model.modules()) == wrapped
    monkeypatch.undo()
    ratios = rl.fp32_time_ratio(_linear().weight, (1, 3), calls=3)  # the real timing: one ratio per row count
    assert len(ratios) == 2 and all(0 < r < float("inf") for r in ratios)


def test_engine_knob():
    greedy = SamplingParams(max_tokens=8, temperature=0)
    for rows in (0, 3):
        with Engine(EngineConfig(model="tiny-llama", draft="ngram", online=False, dtype="bfloat16",
                                 fp32_rows=rows)) as eng:
            wrapped = [m for m in eng.runner.model.modules() if isinstance(m, RowAdaptiveLinear)]
            assert (eng.stats()["fp32_rows_bytes"] > 0) == bool(wrapped)   # on where this CPU gains
            assert rows or not wrapped
            outs = eng.generate_batch(["hello hello ", "def f(x):"], greedy)
            assert all(len(o.token_ids) == 8 for o in outs)
    with Engine(EngineConfig(model="tiny-llama", draft="none", online=False, dtype="float32")) as eng:
        assert eng.stats()["fp32_rows_bytes"] == 0                # fp32 engines are never wrapped
    with pytest.raises(ValueError, match="fp32_rows"):
        EngineConfig(fp32_rows=-1)
