"""Draft proposers: every draft returns a `DraftTree` per sequence through one interface."""
from aurora.drafts.base import Proposer, ProposeContext
from aurora.drafts.factory import build_proposer

__all__ = ["Proposer", "ProposeContext", "build_proposer"]
