"""Save and load a draft head: safetensors weights + a small JSON config (incl. d2t map).

Aurora's own format (`aurora-eagle-v2`): `config.json` (head shape + meta) and
`draft.safetensors` (the head's state_dict under EAGLE-3's `midlayer.*` names, `d2t` as
absolute target ids). Training state for resumable learning lives in `training_state.py`.
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from aurora.models.eagle import EagleHead

FORMAT = "aurora-eagle-v2"


def save_head(head: EagleHead, path: str | Path, meta: dict | None = None) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in head.state_dict().items()}
    save_file(state, str(path / "draft.safetensors"))
    config = {"format": FORMAT, **head.config_dict(), **(meta or {})}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def check_head_fits(head: EagleHead, runner, source) -> None:
    """Refuse a head whose shapes or vocabulary map do not fit the served target."""
    if runner is None:
        return
    if head.hidden != runner.hidden_size or head.target_hidden != runner.hidden_size:
        raise ValueError(f"{source}: draft hidden size {head.hidden} (target_hidden {head.target_hidden}) "
                         f"does not match the target's {runner.hidden_size}")
    if head.draft_vocab > runner.vocab_size:
        raise ValueError(f"{source}: draft vocabulary {head.draft_vocab} exceeds the target's {runner.vocab_size}")
    d2t = head.d2t
    if len(d2t) and (int(d2t.min()) < 0 or int(d2t.max()) >= runner.vocab_size):
        raise ValueError(f"{source}: d2t maps outside the target vocabulary [0, {runner.vocab_size})")
    if len(set(d2t.tolist())) != len(d2t):
        raise ValueError(f"{source}: d2t maps two draft ids to the same target id")


def load_head(path: str | Path, runner=None) -> tuple[EagleHead, dict]:
    path = Path(path).expanduser()
    cfg_file, weights = path / "config.json", path / "draft.safetensors"
    if not cfg_file.exists() or not weights.exists():
        raise ValueError(f"no Aurora draft checkpoint at {path} (expected config.json + draft.safetensors)")
    meta = json.loads(cfg_file.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{cfg_file}: format {meta.get('format')!r} is not {FORMAT!r} "
                         "(aurora-eagle-v1 heads predate the EAGLE-3 layer and cannot be loaded)")
    head = EagleHead.from_config(meta)
    if runner is not None and meta["hidden"] != runner.hidden_size:
        raise ValueError(f"checkpoint hidden size {meta['hidden']} does not match target {runner.hidden_size}")
    state = load_file(str(weights))
    missing, unexpected = set(head.state_dict()) - set(state), set(state) - set(head.state_dict())
    if missing or unexpected:
        raise ValueError(f"{weights}: missing tensors {sorted(missing)}, unexpected {sorted(unexpected)}")
    head.load_state_dict(state)
    check_head_fits(head, runner, path)
    return head, meta
