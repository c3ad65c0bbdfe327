"""The flywheel: live traces, a background trainer, and double-buffered hot swap."""
from aurora.flywheel.flywheel import Flywheel

__all__ = ["Flywheel"]
