"""Build a proposer from the `EngineConfig.draft` string ("eagle+ngram", "model:tiny-llama", ...)."""
from __future__ import annotations

from aurora.drafts.base import NoProposer, Proposer
from aurora.drafts.compose import ComposedProposer
from aurora.drafts.ngram import NgramProposer


def build_proposer(spec: str, runner, config) -> Proposer:
    parts = []
    for part in spec.split("+"):
        kind, _, arg = part.partition(":")
        if kind == "none":
            continue
        if kind == "ngram":
            parts.append(NgramProposer())
        elif kind == "eagle":
            from aurora.drafts.eagle import EagleProposer
            parts.append(EagleProposer.create(runner, config, checkpoint=arg or None))
        elif kind == "suffix":
            from aurora.drafts.suffix import SuffixProposer
            parts.append(SuffixProposer(config.spec, path=arg or None))
        elif kind == "model":
            from aurora.drafts.model import ModelProposer
            if not arg:
                raise ValueError("draft 'model:' needs a path or preset, e.g. model:tiny-llama")
            parts.append(ModelProposer(arg, runner, config))
        else:
            raise ValueError(f"unknown draft {part!r}")
    if not parts:
        return NoProposer()
    return parts[0] if len(parts) == 1 else ComposedProposer(parts)
