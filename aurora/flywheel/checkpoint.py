"""Draft checkpoints: the head (weights + config) and, for resumable learning, the trainer state.

A directory holds `config.json` (format `aurora-eagle-v2`: head shape, version, trainer
steps, tapped target layers), `draft.safetensors` (the published head under EAGLE-3's
`midlayer.*` names, `d2t` as absolute target ids) and optionally `training.pt` (trainer
head, AdamW state, draft-vocabulary counts, step counters, a bounded replay sample).
Each file is written to a temp file and renamed into place; all carry one snapshot id,
and a loader refuses a directory whose files come from different snapshots.
"""
from __future__ import annotations

import json
import os
import tempfile
import uuid
from collections import Counter
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from aurora.models.eagle import EagleHead

FORMAT = "aurora-eagle-v2"
REPLAY_BYTES = 64 << 20          # bound on the replay sample saved with the training state


# ---------------------------------------------------------------- files
def write_files(path: str | Path, files: dict, snapshot: str | None = None) -> Path:
    """Write {name: JSON dict | {tensor name: tensor} (.safetensors) | object (.pt)} into `path`,
    each through a temp file + os.replace; `config.json` goes last (it names the snapshot)."""
    path = Path(path).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    order = sorted(files, key=lambda n: n == "config.json")
    for name in order:
        content = files[name]
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=path)
        os.close(fd)
        try:
            if name.endswith(".json"):
                Path(tmp).write_text(json.dumps(content, indent=2))
            elif name.endswith(".safetensors"):
                save_file(content, tmp, metadata={"snapshot": snapshot} if snapshot else None)
            else:
                torch.save(content, tmp)
            os.replace(tmp, path / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return path


def _cpu_state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in module.state_dict().items()}


def save_head(head: EagleHead, path: str | Path, meta: dict | None = None) -> Path:
    snapshot = uuid.uuid4().hex
    config = {"format": FORMAT, **head.config_dict(), **(meta or {}), "snapshot": snapshot}
    return write_files(path, {"draft.safetensors": _cpu_state(head), "config.json": config}, snapshot)


# ---------------------------------------------------------------- checks
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


def check_same_shape(loaded: EagleHead, current: EagleHead, source) -> None:
    """Refuse a checkpoint whose head differs in shape from the one this server built."""
    a, b = loaded.config_dict(), current.config_dict()
    diff = {k: (a[k], b.get(k)) for k in a if k != "rope_theta" and a[k] != b.get(k)}
    if diff:
        raise ValueError(f"{source}: checkpoint head does not match this server's draft "
                         f"(checkpoint, configured): {diff}; use another directory or delete it")


# ---------------------------------------------------------------- load
def load_head(path: str | Path, runner=None) -> tuple[EagleHead, dict]:
    path = Path(path).expanduser()
    cfg_file, weights = path / "config.json", path / "draft.safetensors"
    if not cfg_file.exists() or not weights.exists():
        raise ValueError(f"no Aurora draft checkpoint at {path} (expected config.json + draft.safetensors)")
    meta = json.loads(cfg_file.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{cfg_file}: format {meta.get('format')!r} is not {FORMAT!r} "
                         "(aurora-eagle-v1 heads predate the EAGLE-3 layer and cannot be loaded)")
    if meta.get("snapshot"):
        with safe_open(str(weights), "pt") as f:
            if (f.metadata() or {}).get("snapshot") != meta["snapshot"]:
                raise ValueError(f"{path}: draft.safetensors and config.json come from different saves "
                                 "(interrupted write?)")
    head = EagleHead.from_config(meta)
    if runner is not None and meta["hidden"] != runner.hidden_size:
        raise ValueError(f"checkpoint hidden size {meta['hidden']} does not match target {runner.hidden_size}")
    state = load_file(str(weights))
    missing, unexpected = set(head.state_dict()) - set(state), set(state) - set(head.state_dict())
    if missing or unexpected:
        raise ValueError(f"{weights}: missing tensors {sorted(missing)}, unexpected {sorted(unexpected)}")
    head.load_state_dict(state)
    check_head_fits(head, runner, path)
    if meta.get("feature_layers") is not None:
        meta["feature_layers"] = tuple(meta["feature_layers"])
    return head, meta


def load_any(path: str | Path, runner) -> tuple[EagleHead, dict]:
    """`eagle:<dir>`: Aurora's own checkpoint, or an EAGLE-3 draft in legacy or speculators format."""
    path = Path(path).expanduser()
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise ValueError(f"no Aurora draft checkpoint at {path} (expected config.json + draft.safetensors, "
                         "or an EAGLE-3 config.json + model.safetensors)")
    cfg = json.loads(cfg_file.read_text())
    if "format" in cfg:
        return load_head(path, runner)
    from aurora.flywheel.export import load_eagle3_dir
    return load_eagle3_dir(path, runner)


# ---------------------------------------------------------------- training state
def _record_dict(rec) -> dict:
    """A TraceRecord as plain data (tensors on CPU); every field but its creation time."""
    from dataclasses import fields
    out = {}
    for f in fields(rec):
        if f.name == "created":
            continue
        v = getattr(rec, f.name)
        out[f.name] = v.cpu() if torch.is_tensor(v) else [list(r) for r in v] if f.name == "rejected" else v
    return out


def _record(d: dict):
    from aurora.flywheel.traces import TraceRecord
    d = dict(d)
    d["rejected"] = [tuple(r) for r in d.get("rejected", [])]
    return TraceRecord(**d)


def bounded_sample(records: list, max_bytes: int = REPLAY_BYTES) -> list:
    """The most recent records whose total size fits `max_bytes`."""
    out, total = [], 0
    for rec in reversed(records):
        if total + rec.nbytes > max_bytes:
            break
        out.append(rec)
        total += rec.nbytes
    return out[::-1]


def snapshot_training(published, trainer_head, optimizer, counts: Counter, version: int, steps: int,
                      extra: dict | None = None, replay: list | None = None, holdout: list | None = None) -> dict:
    """A consistent copy of everything learning needs (call under the trainer's lock; cheap)."""
    return {"published": _cpu_state(published), "trainer_head": _cpu_state(trainer_head),
            "optimizer": _cpu_opt_state(optimizer.state_dict()), "counts": Counter(counts),
            "version": int(version), "steps": int(steps), "extra": dict(extra or {}),
            "replay": list(replay or []), "holdout": list(holdout or []), "config": published.config_dict()}


def _cpu_opt_state(state):
    if torch.is_tensor(state):
        return state.detach().to("cpu").clone()
    if isinstance(state, dict):
        return {k: _cpu_opt_state(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_cpu_opt_state(v) for v in state)
    return state


def save_training(path: str | Path, snap: dict, meta: dict | None = None) -> Path:
    """Write a `snapshot_training` result: draft.safetensors + training.pt + config.json."""
    snapshot = uuid.uuid4().hex
    ids = sorted(snap["counts"])
    replay = bounded_sample(snap["replay"])
    training = {
        "snapshot": snapshot, "trainer_head": snap["trainer_head"], "optimizer": snap["optimizer"],
        "vocab_ids": torch.tensor(ids, dtype=torch.long),
        "vocab_counts": torch.tensor([snap["counts"][i] for i in ids], dtype=torch.long),
        "version": snap["version"], "steps": snap["steps"], "extra": snap["extra"],
        "replay": [_record_dict(r) for r in replay], "holdout": [_record_dict(r) for r in snap["holdout"]],
    }
    config = {"format": FORMAT, **snap["config"], **(meta or {}), "version": snap["version"],
              "trainer_steps": snap["steps"], "snapshot": snapshot}
    return write_files(path, {"draft.safetensors": snap["published"], "training.pt": training,
                              "config.json": config}, snapshot)


def default_draft_dir(model: str) -> Path:
    """Per-model directory under the user cache where `aurora serve` persists its draft."""
    from aurora.models.loader import cache_dir
    name = model
    if os.sep in model or Path(model).expanduser().exists():
        resolved = str(Path(model).expanduser().resolve())
        name = f"{Path(resolved).name}-{uuid.uuid5(uuid.NAMESPACE_URL, resolved).hex[:8]}"
    return cache_dir() / "drafts" / name


def has_checkpoint(path: str | Path) -> bool:
    path = Path(path).expanduser()
    return (path / "config.json").exists() and (path / "draft.safetensors").exists()


def load_training(path: str | Path, runner, current: EagleHead) -> tuple[EagleHead, dict, dict | None]:
    """(published head, config meta, training state or None), verified against the target and
    against `current` (the head this server built: same shape and draft-vocabulary size)."""
    path = Path(path).expanduser()
    head, meta = load_head(path, runner)
    check_same_shape(head, current, path)
    tfile = path / "training.pt"
    if not tfile.exists():
        return head, meta, None
    state = torch.load(str(tfile), map_location="cpu", weights_only=True)
    if state.get("snapshot") != meta.get("snapshot"):
        raise ValueError(f"{path}: training.pt and config.json come from different saves (interrupted write?)")
    th = state["trainer_head"]
    if set(th) != set(head.state_dict()) or any(th[k].shape != v.shape for k, v in head.state_dict().items()):
        raise ValueError(f"{path}: training.pt trainer head does not match the draft's shapes")
    d2t = th["d2t"]
    if int(d2t.max()) >= runner.vocab_size or len(set(d2t.tolist())) != len(d2t):
        raise ValueError(f"{path}: training.pt vocabulary map does not fit the target vocabulary")
    state["counts"] = Counter(dict(zip(state.pop("vocab_ids").tolist(), state.pop("vocab_counts").tolist())))
    state["replay"] = [_record(d) for d in state["replay"]]
    state["holdout"] = [_record(d) for d in state["holdout"]]
    return head, meta, state
