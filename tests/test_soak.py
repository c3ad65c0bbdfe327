"""Bounded fault-injection soak on loopback (tiny model, online trainer): 32 concurrent
streaming clients while the harness of `examples/fault_soak.py` injects a trainer exception,
a NaN candidate, a NaN live draft slot, a proposer exception for poisoned requests, client
disconnects and KV pressure. Nothing may be lost, hang or leak; greedy output stays exact;
/metrics agrees with what the clients saw.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

NUM_REQUESTS = 96
NUM_CLIENTS = 32
MAX_TOKENS = 16
KV_TOKENS = 768                # 48 blocks of 16: far fewer than 16 running requests need


@pytest.fixture(scope="module")
def soak():
    path = Path(__file__).resolve().parents[1] / "examples" / "fault_soak.py"
    spec = importlib.util.spec_from_file_location("fault_soak", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["fault_soak"] = module              # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_fault_soak(soak):
    reqs = soak.make_requests(NUM_REQUESTS, MAX_TOKENS)
    reference = soak.greedy_reference("tiny-llama", reqs)
    with soak.build_engine("tiny-llama", KV_TOKENS) as engine:
        r = soak.run_soak(engine, reqs, reference, clients=NUM_CLIENTS, timeout=60)
    print("\nsoak:", r)
    # every fault happened
    assert all(r["faults_fired"].values()), r["faults_fired"]
    assert r["preemptions"] > 0 and r["disconnected"] > 0 and r["poisoned_requests"] > 0
    # nothing lost, hung or leaked; no fault became a request error
    assert r["lost"] == 0 and r["hung"] == 0 and r["errors"] == 0, r["error_messages"]
    assert r["completed"] + r["disconnected"] == NUM_REQUESTS
    assert r["bad_finish_reasons"] == 0
    assert r["leaked_blocks"] == 0
    # greedy output is the no-fault output
    assert r["greedy_checked"] >= NUM_REQUESTS // 3 and r["greedy_mismatches"] == []
    # the trainer died (injected) and serving did not notice; the NaN candidate was restored
    assert "injected" in (r["trainer"]["error"] or "") and r["trainer"]["alive"] is False
    assert r["trainer"]["nonfinite_restores"] >= 1
    # draft failures were isolated and counted
    assert r["draft_failures"] >= r["poisoned_requests"] and r["engine_errors"] == 0
    # /metrics agrees with the clients
    m = r["metrics"]
    assert m["http_200"] + m["http_499"] == NUM_REQUESTS and r["engine_requests"] == NUM_REQUESTS
    assert m["http_200"] >= r["completed"] and m["http_499"] <= r["disconnected"]      # 499: client left
    assert r["completed"] <= m["finished_length"] <= r["completed"] + r["disconnected"]
    assert m["finished_length"] + m["cancelled"] >= NUM_REQUESTS
    assert m["cancelled"] <= r["disconnected"]
    assert m["draft_failures"] >= r["draft_failures"] and m["engine_errors"] == 0
