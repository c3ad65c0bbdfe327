"""Speculation policy hook: picks the tree shape per step, or switches speculation off.

The default is fixed (the configured `SpecConfig`). An adaptive controller subclasses
`SpeculationPolicy` and overrides `choose`.
"""
from __future__ import annotations

from aurora.config import SpecConfig


class SpeculationPolicy:
    def __init__(self, spec: SpecConfig):
        self.spec = spec

    @property
    def budget(self) -> int:
        """Upper bound on tree nodes per sequence (KV blocks are reserved for it)."""
        return self.spec.max_nodes + self.spec.depth + 1

    def choose(self, seqs) -> SpecConfig | None:
        """Tree shape for this step; None disables speculation for the step."""
        return self.spec
