"""EAGLE-3 export/import: the exported files, read by an independent reference, give
Aurora's logits; aux-layer ids follow each engine's convention; export -> import gives
identical greedy proposals and the same tau; bad directories are clear errors.

The reference below is written from the engines' documented semantics (SGLang / vLLM
`llama_eagle3.py`, speculators' Eagle3 first layer), not from Aurora's code: it reads
config.json and model.safetensors *by name*, runs a causal sequence (not a tree) with its
own RoPE/GQA/RMSNorm, and maps draft ids to target ids with `d2t` offsets.
(The `speculators` package itself pins transformers<=5.19 and CUDA torch, so it is not a
test dependency.) Tolerance: fp32, atol 2e-5 + rtol 1e-4 on logits.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from aurora import Engine, EngineConfig, SamplingParams
from aurora.drafts.eagle import EagleProposer
from aurora.flywheel.checkpoint import load_any, save_head
from aurora.flywheel.export import aux_ids, export_head, feature_layers_from_ids
from aurora.models.eagle import build_head

FORMATS = ["eagle3", "speculators"]
GREEDY = SamplingParams(max_tokens=24, temperature=0)
PROMPTS = ["the cat sat on ", "def f(x): return", "hello hello ", "1, 2, 3, 4"]


# ---------------------------------------------------------------- independent reference
def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, pos, theta):                      # x [T, heads, D], HF rotate-half convention
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    freqs = torch.outer(pos.float(), inv_freq)
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos()[:, None], emb.sin()[:, None]
    rot = torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1)
    return x * cos + rot * sin


class Reference:
    """EAGLE-3 draft from exported files: fc -> one layer with 2H-input attention -> norm -> lm_head."""

    def __init__(self, path):
        cfg = json.loads((path / "config.json").read_text())
        self.w = load_file(str(path / "model.safetensors"))
        if cfg.get("speculators_model_type") == "eagle3":
            layer, prefix = cfg["transformer_layer_config"], "layers.0."
            self.aux = cfg["eagle_aux_hidden_state_layer_ids"]
            self.capture_before = list(self.aux)                     # vLLM: captured before layer i
        else:
            assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["num_hidden_layers"] == 1
            layer, prefix = cfg, "midlayer."
            self.aux = cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"]
            self.capture_before = [i + 1 for i in self.aux]          # SGLang: layers_to_capture = id + 1
        self.p = lambda name: self.w[prefix + name].float()
        self.norm_before_residual = cfg.get("norm_before_residual", False)
        self.eps, self.theta = layer["rms_norm_eps"], layer["rope_theta"]
        self.nh, self.nkv = layer["num_attention_heads"], layer["num_key_value_heads"]
        self.hd = layer.get("head_dim") or layer["hidden_size"] // self.nh
        self.draft_vocab = cfg["draft_vocab_size"]
        assert self.w["d2t"].dtype == torch.int64 and self.w["t2d"].dtype == torch.bool
        self.target_ids = torch.arange(self.draft_vocab) + self.w["d2t"]      # target = draft + d2t[draft]

    def layer(self, embeds, hidden, pos, past=None, mask=None):
        """embeds, hidden: [T, H]; returns pre-norm output [T, H] and this step's (k, v)."""
        p, eps = self.p, self.eps
        residual = hidden
        h = _rms(hidden, p("hidden_norm.weight"), eps)
        if self.norm_before_residual:
            residual = h
        x = torch.cat([_rms(embeds, p("input_layernorm.weight"), eps), h], -1)
        T = x.shape[0]
        q = _rope((x @ p("self_attn.q_proj.weight").T).view(T, self.nh, self.hd), pos, self.theta)
        k = _rope((x @ p("self_attn.k_proj.weight").T).view(T, self.nkv, self.hd), pos, self.theta)
        v = (x @ p("self_attn.v_proj.weight").T).view(T, self.nkv, self.hd)
        if past is not None:
            k, v = torch.cat([past[0], k]), torch.cat([past[1], v])
        rep = self.nh // self.nkv
        kk, vv = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        scores = torch.einsum("thd,shd->hts", q, kk) / self.hd ** 0.5
        if mask is None:
            mask = torch.ones(T, k.shape[0], dtype=torch.bool).tril(k.shape[0] - T)
        att = torch.einsum("hts,shd->thd", scores.masked_fill(~mask, float("-inf")).softmax(-1), vv)
        residual = residual + att.reshape(T, -1) @ p("self_attn.o_proj.weight").T
        h = _rms(residual, p("post_attention_layernorm.weight"), eps)
        mlp = (torch.nn.functional.silu(h @ p("mlp.gate_proj.weight").T) * (h @ p("mlp.up_proj.weight").T))
        return residual + mlp @ p("mlp.down_proj.weight").T, (k, v)

    def logits(self, prenorm):
        return _rms(prenorm, self.w["norm.weight"].float(), self.eps) @ self.w["lm_head.weight"].float().T

    def fc(self, aux):
        return aux @ self.w["fc.weight"].float().T


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def engine():
    eng = Engine(EngineConfig(model="tiny-llama", draft="eagle", online=False, dtype="float32"))
    yield eng
    eng.close()


def _trained_like_head(runner, draft_vocab=200, norm_before_residual=False, seed=3):
    """A head with non-trivial norms and a shuffled sparse vocabulary map (so a swapped norm,
    a wrong residual or an absolute-vs-offset d2t mix-up changes the logits)."""
    head = build_head(runner, draft_vocab, seed)
    head.norm_before_residual = norm_before_residual
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in head.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
            else:
                p.mul_(5)
        ids = torch.randperm(runner.vocab_size, generator=g)[:draft_vocab].sort().values
        head.d2t.copy_(ids)
    return head.float().eval()


# ---------------------------------------------------------------- aux-layer arithmetic
@pytest.mark.parametrize("n", [4, 12, 30, 32])
def test_aux_ids_conventions(n):
    taps = (min(2, n - 1), n // 2, max(n - 3, 0))             # outputs Aurora's runner taps
    sglang, vllm = aux_ids(taps, "eagle3"), aux_ids(taps, "speculators")
    # HF hidden_states[i] is the stream *before* layer i (= output of layer i-1); Aurora reads [l + 1].
    assert [i + 1 for i in sglang] == [l + 1 for l in taps]   # SGLang captures before id + 1
    assert list(vllm) == [l + 1 for l in taps]                 # vLLM captures before id
    for fmt in FORMATS:
        assert feature_layers_from_ids(aux_ids(taps, fmt), fmt, n) == taps
        # absent ids: both engines' default, captured before [2, N//2, N-3]
        assert feature_layers_from_ids(None, fmt, n) == (1, n // 2 - 1, n - 4) or n < 5
    with pytest.raises(ValueError, match="do not name 3 outputs"):
        feature_layers_from_ids([0, 1, n + 1], "speculators", n)


# ---------------------------------------------------------------- equal logits
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("nbr", [False, True])
def test_reference_reads_export_with_equal_logits(engine, tmp_path, fmt, nbr):
    runner = engine.runner
    head = _trained_like_head(runner, norm_before_residual=nbr)
    out = export_head(head, runner, tmp_path / fmt, fmt, verifier="tiny/verifier", speculative_tokens=4)
    ref = Reference(out)
    cfg = json.loads((out / "config.json").read_text())
    taps = [l + 1 for l in runner.feature_layers]
    assert ref.capture_before == taps                              # the engine would tap what Aurora taps
    assert cfg.get("norm_before_residual") is nbr
    if fmt == "speculators":
        assert cfg["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 4
        assert cfg["speculators_config"]["verifier"]["name_or_path"] == "tiny/verifier"
    assert torch.equal(ref.target_ids, head.d2t)
    assert int(ref.w["t2d"].sum()) == head.draft_vocab and bool(ref.w["t2d"][head.d2t].all())

    g = torch.Generator().manual_seed(0)
    T, H = 12, runner.hidden_size
    tokens = torch.randint(0, runner.vocab_size, (T,), generator=g)
    aux = 3 * torch.randn(T, 3 * H, generator=g)
    pos = torch.arange(5, 5 + T)
    emb = runner.embed_tokens(tokens).float()
    with torch.no_grad():
        mask = torch.ones(T, T, dtype=torch.bool).tril()
        h, K, V = head.rows_step(emb, head.fc(aux), pos, None, None, mask)
        ours = head.logits(h)
        ref_h, past = ref.layer(emb, ref.fc(aux), pos)
        theirs = ref.logits(ref_h)
        torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)
        assert ours.std() > 0.5                                      # logits are not trivially flat
        # level 2: a draft row fed the pre-norm output of the last context row, at the next position
        tok2 = head.d2t[ours[-1].argmax()].view(1)
        m2 = torch.ones(1, T + 1, dtype=torch.bool)
        h2, _, _ = head.rows_step(runner.embed_tokens(tok2).float(), h[-1:], pos[-1:] + 1, K, V, m2)
        r2, _ = ref.layer(runner.embed_tokens(tok2).float(), ref_h[-1:], pos[-1:] + 1, past, m2)
        torch.testing.assert_close(head.logits(h2), ref.logits(r2), atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------- round trip
def _proposals(eng):
    """Every proposed tree, per request (keyed by its prompt's first tokens), in step order."""
    prop = eng.proposer
    seen: dict[tuple, list] = {}
    orig = prop.propose

    def record(seqs, ctx):
        trees = orig(seqs, ctx)
        for seq, t in zip(seqs, trees):
            seen.setdefault(tuple(seq.token_ids[:6]), []).append((len(seq.token_ids), list(t.token_ids)))
        return trees
    prop.propose = record
    outs = eng.generate_batch(PROMPTS, GREEDY)
    return seen, [o.token_ids for o in outs], sum(o.stats["accepted_length"] for o in outs) / len(outs)


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_import_round_trip_same_proposals(engine, tmp_path, fmt):
    runner = engine.runner
    head = _trained_like_head(runner, draft_vocab=runner.vocab_size)   # full vocabulary: proposals matter
    save_head(head, tmp_path / "aurora", {"version": 4})
    export_head(head, runner, tmp_path / fmt, fmt)
    results = []
    for src in ("aurora", fmt):
        eng = Engine(EngineConfig(model="tiny-llama", draft=f"eagle:{tmp_path / src}", online=False,
                                  dtype="float32"))
        try:
            assert isinstance(eng.proposer, EagleProposer)
            results.append(_proposals(eng))
        finally:
            eng.close()
    (p_a, out_a, tau_a), (p_b, out_b, tau_b) = results
    assert len(p_a) == len(PROMPTS) and sum(len(v) for v in p_a.values()) > 10
    assert p_a == p_b and out_a == out_b and tau_a == tau_b


def test_import_restores_taps_and_refuses_bad_dirs(engine, tmp_path):
    runner = engine.runner
    head = _trained_like_head(runner)
    out = export_head(head, runner, tmp_path / "x", "speculators")
    loaded, meta = load_any(out, runner)
    assert meta["feature_layers"] == tuple(runner.feature_layers)
    for k, v in head.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k

    def edit(fn, name):
        d = tmp_path / name
        export_head(head, runner, d, "eagle3")
        cfg = json.loads((d / "config.json").read_text())
        fn(d, cfg)
        (d / "config.json").write_text(json.dumps(cfg))
        return d

    d = edit(lambda d, c: c.update(hidden_size=128), "hidden")
    with pytest.raises(ValueError, match="hidden size"):
        load_any(d, runner)
    d = edit(lambda d, c: c.update(vocab_size=runner.vocab_size + 1), "vocab")
    with pytest.raises(ValueError, match="vocabulary"):
        load_any(d, runner)
    d = edit(lambda d, c: (d / "model.safetensors").unlink(), "missing")
    with pytest.raises(ValueError, match="no model.safetensors"):
        load_any(d, runner)

    def rename(d, c):        # a misnamed tensor would load silently as untrained in SGLang: refuse it
        from safetensors.torch import save_file
        w = load_file(str(d / "model.safetensors"))
        w["midlayer.hidden_layernorm.weight"] = w.pop("midlayer.hidden_norm.weight")
        save_file(w, str(d / "model.safetensors"))
    d = edit(rename, "renamed")
    with pytest.raises(ValueError, match="missing tensors"):
        load_any(d, runner)
    with pytest.raises(ValueError, match="no Aurora draft checkpoint"):
        load_any(tmp_path / "nothing", runner)


def _post(srv, body):
    import http.client
    from urllib.parse import urlsplit
    url = urlsplit(srv.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    conn.request("POST", "/v1/speculator", body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = json.loads(resp.read())
    conn.close()
    return resp.status, data


def test_admin_export_action(engine, tmp_path):
    from aurora.config import ServerConfig
    from aurora.server.serve import ServerThread
    with ServerThread(engine, ServerConfig(port=0)) as srv:
        assert _post(srv, {"action": "export", "dir": "d"})[0] == 409           # no --save-dir
    with ServerThread(engine, ServerConfig(port=0, save_dir=str(tmp_path))) as srv:
        status, data = _post(srv, {"action": "export", "dir": "d1", "format": "speculators"})
        assert status == 200 and data["result"]["format"] == "speculators", data
        cfg = json.loads((tmp_path / "exports" / "d1" / "config.json").read_text())
        assert cfg["eagle_aux_hidden_state_layer_ids"] == [l + 1 for l in engine.runner.feature_layers]
        for bad in ({"dir": "../x"}, {"dir": "/tmp/x"}, {"dir": "d", "format": "onnx"}, {"dir": "d", "path": "p"}):
            assert _post(srv, {"action": "export", **bad})[0] == 400, bad
    assert not (tmp_path.parent / "x").exists()


def test_rms_norm_matches_the_formula_and_promotes_mixed_dtypes():
    """The head's RMSNorm (torch's fused kernel) equals x / rms(x) * w in fp32, and the fp32
    training copy fed bf16 embeddings computes in fp32 (no silent bf16 rounding of its output)."""
    from aurora.models.eagle import RMSNorm
    norm = RMSNorm(16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 16)
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight
    torch.testing.assert_close(norm(x), ref)
    y = norm(x.to(torch.bfloat16))
    assert y.dtype == torch.float32
    xb = x.to(torch.bfloat16).float()
    torch.testing.assert_close(y, xb * torch.rsqrt(xb.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight)
