"""The speculator admin `save` also writes the suffix index into --save-dir (or nothing, when
persistence is off), and a restarted engine given `draft="suffix:<dir>"` drafts from that memory."""
from __future__ import annotations

from aurora import Engine, EngineConfig, SamplingParams, ServerConfig, SpecConfig
from aurora.drafts.suffix import find_suffix
from aurora.server import ServerThread
from test_server import C, call, post

SPEC = SpecConfig(suffix_bytes=2 << 20)


def test_admin_save_writes_the_index_and_a_restart_remembers(tmp_path):
    eng = Engine(EngineConfig(model="tiny-llama", draft="suffix+ngram", online=False, dtype="float32", spec=SPEC))
    try:
        with ServerThread(eng, ServerConfig(port=0, save_dir=str(tmp_path))) as srv:
            assert post(srv, C, {"prompt": "the cat sat on the mat", "max_tokens": 24, "temperature": 0})[0] == 200
            status, _, data = post(srv, "/v1/speculator", {"action": "save"})
            assert status == 200 and data["suffix_index"] == str(tmp_path), data
            assert post(srv, "/v1/speculator", {"action": "pause"})[0] == 409     # no trainer to pause
        tokens = find_suffix(eng.proposer).stats()["tokens"]
    finally:
        eng.close()
    assert (tmp_path / "suffix_index.npz").exists() and tokens > 24
    again = Engine(EngineConfig(model="tiny-llama", draft=f"suffix:{tmp_path}", online=False, dtype="float32",
                                spec=SPEC))
    try:
        assert find_suffix(again.proposer).stats()["tokens"] == tokens
        out = again.generate_batch(["the cat sat on the mat"], SamplingParams(max_tokens=24, temperature=0))[0]
        assert out.stats["accepted_length"] > 2.0                    # drafted from the remembered reply
    finally:
        again.close()


def test_admin_save_with_persistence_off_writes_nothing(tmp_path):
    spec = SpecConfig(suffix_bytes=2 << 20, suffix_persist=False)
    eng = Engine(EngineConfig(model="tiny-llama", draft="suffix", online=False, dtype="float32", spec=spec))
    try:
        with ServerThread(eng, ServerConfig(port=0, save_dir=str(tmp_path))) as srv:
            status, _, data = post(srv, "/v1/speculator", {"action": "save"})
            assert status == 200 and data["suffix_index"] is None
            assert call(srv, "GET", "/v1/speculator")[0] == 200
    finally:
        eng.close()
    assert not any(tmp_path.iterdir())
