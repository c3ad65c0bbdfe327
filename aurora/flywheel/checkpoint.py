"""Save and load a draft head: safetensors weights + a small JSON config (incl. d2t map)."""
from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from aurora.models.eagle import EagleHead

FORMAT = "aurora-eagle-v1"


def save_head(head: EagleHead, path: str | Path, meta: dict | None = None) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in head.state_dict().items()}
    save_file(state, str(path / "draft.safetensors"))
    config = {"format": FORMAT, **head.config_dict(), **(meta or {})}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def load_head(path: str | Path, runner=None) -> tuple[EagleHead, dict]:
    path = Path(path).expanduser()
    cfg_file, weights = path / "config.json", path / "draft.safetensors"
    if not cfg_file.exists() or not weights.exists():
        raise ValueError(f"no Aurora draft checkpoint at {path} (expected config.json + draft.safetensors)")
    meta = json.loads(cfg_file.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{cfg_file}: not an {FORMAT} checkpoint")
    head = EagleHead(meta["hidden"], meta["heads"], meta["head_dim"], meta["intermediate"],
                     meta["draft_vocab"], meta["rope_theta"])
    if runner is not None and (meta["hidden"] != runner.hidden_size):
        raise ValueError(f"checkpoint hidden size {meta['hidden']} does not match target {runner.hidden_size}")
    head.load_state_dict(load_file(str(weights)))
    return head, meta
