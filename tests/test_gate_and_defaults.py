"""CPU dtype choice. (The composed-draft gate, the serving/trainer CPU split and rollback are
tested in tests/test_flywheel_stream.py, test_flywheel_traces.py and test_flywheel_guard.py.)"""
from __future__ import annotations

import torch

from aurora.models import loader


def test_auto_dtype(monkeypatch):
    monkeypatch.setattr(loader, "cpu_has_fast_bf16", lambda: True)
    assert loader.resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16
    monkeypatch.setattr(loader, "cpu_has_fast_bf16", lambda: False)
    assert loader.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert loader.resolve_dtype("float32", torch.device("cpu")) == torch.float32
