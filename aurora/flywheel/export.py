"""Export/import the draft head as EAGLE-3 files that vLLM and SGLang serve.

Two layouts of the same tensors (the head *is* the EAGLE-3 layer, so this is renaming):
* "eagle3" (legacy EAGLE-3 / SGLang): Llama config with `LlamaForCausalLMEagle3`,
  `midlayer.*`, aux ids in `eagle_config` counted as layer *outputs*;
* "speculators" (vLLM `vllm serve <dir>`): `speculators_model_type: eagle3`,
  `transformer_layer_config`, `layers.0.*`, aux ids counted as the layer *before which*
  the residual stream is captured (= output of layer id - 1).
`d2t` is stored as offsets (target_id = draft_id + d2t[draft_id]); `t2d` as a bool mask.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

from aurora.flywheel.checkpoint import check_head_fits, write_files
from aurora.models.eagle import EagleHead

log = logging.getLogger("aurora.export")
FORMATS = ("eagle3", "speculators")
LEGACY_ARCH = "LlamaForCausalLMEagle3"
# Presets whose weights come from a published HF model (the verifier vLLM/SGLang should load).
VERIFIERS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------- aux-layer conventions
def aux_ids(feature_layers, fmt: str) -> list[int]:
    """Aurora taps the *outputs* of `feature_layers`. SGLang ("eagle3") names outputs;
    vLLM/speculators name the layer before which the stream is captured: output of l = before l+1."""
    if fmt == "eagle3":
        return [int(l) for l in feature_layers]
    if fmt == "speculators":
        return [int(l) + 1 for l in feature_layers]
    raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")


def feature_layers_from_ids(ids, fmt: str, num_layers: int) -> tuple[int, ...]:
    """Inverse of `aux_ids`; `ids=None` means the engines' default [2, N//2, N-3] (before-layer)."""
    if ids is None:
        outputs = [2 - 1, num_layers // 2 - 1, num_layers - 3 - 1]
    else:
        outputs = [int(i) - (1 if fmt == "speculators" else 0) for i in ids]
    if len(outputs) != 3 or not all(0 <= l < num_layers for l in outputs):
        raise ValueError(f"aux hidden-state layer ids {ids} ({fmt} convention) do not name 3 outputs of "
                         f"the target's {num_layers} layers")
    return tuple(outputs)


# ---------------------------------------------------------------- export
def _verifier(runner, model_name: str | None) -> str:
    if model_name in VERIFIERS:
        return VERIFIERS[model_name]
    if model_name and Path(model_name).expanduser().is_dir():
        return str(Path(model_name).expanduser().resolve())
    return model_name or getattr(runner.config, "_name_or_path", "") or "unknown"


def _layer_config(head: EagleHead, runner) -> dict:
    cfg = runner.config
    return {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu",
        "hidden_size": head.hidden, "intermediate_size": head.intermediate,
        "num_attention_heads": head.heads, "num_key_value_heads": head.kv_heads, "head_dim": head.head_dim,
        "num_hidden_layers": 1, "rms_norm_eps": head.eps, "vocab_size": runner.vocab_size,
        "max_position_embeddings": int(getattr(cfg, "max_position_embeddings", 2048)),
        "rope_theta": head.rope_theta, "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": head.rope_theta},
        "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1, "tie_word_embeddings": False,
        "bos_token_id": getattr(cfg, "bos_token_id", None), "eos_token_id": getattr(cfg, "eos_token_id", None),
    }


def export_tensors(head: EagleHead, vocab_size: int, fmt: str, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """The head's state_dict under the format's names, `d2t` as int64 offsets, `t2d` bool [vocab]."""
    state = {}
    for name, t in head.state_dict().items():
        if name == "d2t":
            continue
        if fmt == "speculators" and name.startswith("midlayer."):
            name = "layers.0." + name[len("midlayer."):]
        state[name] = t.detach().to("cpu", dtype).contiguous()
    d2t = head.d2t.detach().cpu().long()
    state["d2t"] = (d2t - torch.arange(len(d2t))).contiguous()
    t2d = torch.zeros(vocab_size, dtype=torch.bool)
    t2d[d2t] = True
    state["t2d"] = t2d
    return state


def export_config(head: EagleHead, runner, fmt: str, verifier: str, speculative_tokens: int, dtype: str) -> dict:
    layer = _layer_config(head, runner)
    ids = aux_ids(runner.feature_layers, fmt)
    if fmt == "eagle3":
        return {**layer, "architectures": [LEGACY_ARCH], "draft_vocab_size": head.draft_vocab,
                "target_hidden_size": head.target_hidden, "torch_dtype": dtype,
                "eagle_config": {"eagle_aux_hidden_state_layer_ids": ids, "use_aux_hidden_state": True},
                "norm_before_residual": head.norm_before_residual}
    return {
        "speculators_model_type": "eagle3", "architectures": ["Eagle3Speculator"],
        "speculators_version": "0.3.0", "torch_dtype": dtype,
        "transformer_layer_config": layer, "draft_vocab_size": head.draft_vocab,
        "target_hidden_size": head.target_hidden, "norm_before_residual": head.norm_before_residual,
        "norm_before_fc": False, "fc_norm": False, "norm_output": False, "embed_requires_grad": False,
        "eagle_aux_hidden_state_layer_ids": ids,
        "speculators_config": {
            "algorithm": "eagle3", "default_proposal_method": "greedy",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": int(speculative_tokens),
                                  "verifier_accept_k": 1, "accept_tolerance": 0.0}],
            "verifier": {"name_or_path": verifier, "architectures": list(getattr(runner.config, "architectures",
                                                                                  None) or [])},
        },
    }


def export_head(head: EagleHead, runner, path, fmt: str = "eagle3", verifier: str | None = None,
                model_name: str | None = None, speculative_tokens: int = 5, dtype: str = "float32") -> Path:
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    config = export_config(head, runner, fmt, verifier or _verifier(runner, model_name), speculative_tokens, dtype)
    tensors = export_tensors(head, runner.vocab_size, fmt, DTYPES[dtype])
    return write_files(path, {"model.safetensors": tensors, "config.json": config})


def engine_head(engine):
    """The head to export: the flywheel's latest published weights, else the serving slot."""
    flywheel = getattr(engine, "flywheel", None)
    if flywheel is not None:
        with getattr(flywheel, "_state_lock", None) or contextlib.nullcontext():   # a consistent copy
            return copy.deepcopy(flywheel.published), flywheel.version
    prop = engine.proposer
    for p in [prop, getattr(prop, "learned", None), *getattr(prop, "parts", [])]:
        if p is not None and getattr(p, "name", "") == "eagle":
            return p.head, p.version
    raise ValueError("this engine has no EAGLE draft to export (serve with draft='eagle' or 'eagle+ngram')")


def export_engine_draft(engine, path, fmt: str = "eagle3", verifier: str | None = None, dtype: str = "float32") -> dict:
    head, version = engine_head(engine)
    out = export_head(head, engine.runner, path, fmt, verifier, engine.config.model, engine.config.spec.depth, dtype)
    return {"dir": str(out), "format": fmt, "version": version}


# ---------------------------------------------------------------- import
def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    st, pt = path / "model.safetensors", path / "pytorch_model.bin"
    if st.exists():
        return load_file(str(st))
    if pt.exists():
        return torch.load(str(pt), map_location="cpu", weights_only=True)
    raise ValueError(f"{path}: no model.safetensors or pytorch_model.bin next to config.json")


def detect_format(cfg: dict) -> str:
    if cfg.get("speculators_model_type") is not None:
        if cfg["speculators_model_type"] != "eagle3":
            raise ValueError(f"speculators model type {cfg['speculators_model_type']!r} is not eagle3")
        return "speculators"
    if any("Eagle3" in a for a in cfg.get("architectures") or []) or "draft_vocab_size" in cfg:
        return "eagle3"
    raise ValueError("config.json is neither an EAGLE-3 (LlamaForCausalLMEagle3) nor a speculators eagle3 config")


def load_eagle3_dir(path, runner) -> tuple[EagleHead, dict]:
    """Load an EAGLE-3 draft directory (either format) as an EagleHead for `runner`'s target.
    Returns (head, meta) with meta["feature_layers"]: the target layer outputs the draft was trained on."""
    path = Path(path).expanduser()
    cfg = json.loads((path / "config.json").read_text())
    fmt = detect_format(cfg)
    layer = cfg["transformer_layer_config"] if fmt == "speculators" else cfg
    for flag in ("norm_before_fc", "fc_norm", "norm_output"):
        if cfg.get(flag):
            raise ValueError(f"{path}: EAGLE-3 variant with {flag}=true is not supported")
    if int(layer.get("num_hidden_layers", 1)) != 1:
        raise ValueError(f"{path}: drafts with {layer['num_hidden_layers']} layers are not supported (EAGLE-3 has 1)")
    if layer.get("hidden_act", "silu") != "silu" or layer.get("attention_bias") or layer.get("mlp_bias"):
        raise ValueError(f"{path}: only the Llama EAGLE-3 layer (silu MLP, no biases) is supported")
    rope = layer.get("rope_scaling") or {}
    rp = layer.get("rope_parameters") or {}
    if (rope.get("rope_type") or rope.get("type") or rp.get("rope_type") or "default") != "default":
        raise ValueError(f"{path}: rope scaling {rope or rp} is not supported by Aurora's draft head")
    hidden = int(layer["hidden_size"])
    target_hidden = int(cfg.get("target_hidden_size") or layer.get("target_hidden_size") or hidden)
    if hidden != runner.hidden_size or target_hidden != runner.hidden_size:
        raise ValueError(f"{path}: draft hidden size {hidden} / target_hidden_size {target_hidden} does not match "
                         f"the served model's hidden size {runner.hidden_size} (a draft for another model?)")
    vocab = int(layer.get("vocab_size") or runner.vocab_size)
    if vocab != runner.vocab_size:
        raise ValueError(f"{path}: draft's target vocabulary {vocab} != served model's {runner.vocab_size}")
    heads = int(layer["num_attention_heads"])
    draft_vocab = int(cfg.get("draft_vocab_size") or layer.get("draft_vocab_size") or vocab)
    theta = float(layer.get("rope_theta") or rp.get("rope_theta") or 10000.0)
    head = EagleHead(hidden, heads, int(layer.get("head_dim") or hidden // heads), int(layer["intermediate_size"]),
                     draft_vocab, theta, float(layer.get("rms_norm_eps", 1e-6)),
                     int(layer.get("num_key_value_heads") or heads), bool(cfg.get("norm_before_residual", False)),
                     target_hidden)
    state = {}
    for name, t in _read_weights(path).items():
        if name.startswith("model."):
            name = name[len("model."):]
        if name.startswith("layers.0."):
            name = "midlayer." + name[len("layers.0."):]
        state[name] = t
    state.pop("embed_tokens.weight", None)      # the head reads the target's own embeddings
    t2d = state.pop("t2d", None)
    offsets = state.pop("d2t", None)
    if offsets is None:
        if draft_vocab != vocab:
            raise ValueError(f"{path}: draft vocabulary {draft_vocab} < target {vocab} but no d2t map")
        offsets = torch.zeros(draft_vocab, dtype=torch.long)
    if offsets.shape != (draft_vocab,):
        raise ValueError(f"{path}: d2t has shape {tuple(offsets.shape)}, expected ({draft_vocab},)")
    state["d2t"] = offsets.long() + torch.arange(draft_vocab)
    if t2d is not None and (t2d.shape != (vocab,) or not bool(t2d.bool()[state["d2t"].clamp(0, vocab - 1)].all())):
        raise ValueError(f"{path}: t2d mask disagrees with d2t")
    expected = head.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: missing tensors {missing}, unexpected {unexpected}")
    for name, t in state.items():
        if t.shape != expected[name].shape:
            raise ValueError(f"{path}: tensor {name} has shape {tuple(t.shape)}, expected {tuple(expected[name].shape)}")
    head.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
    check_head_fits(head, runner, path)
    ids = cfg.get("eagle_aux_hidden_state_layer_ids") if fmt == "speculators" else \
        (cfg.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    meta = {"format": fmt, "feature_layers": feature_layers_from_ids(ids, fmt, runner.num_layers), "version": 0}
    return head, meta
