"""Double-buffered hot swap: copy trainer weights into the inactive serving slot.

On GPU the copy runs on the trainer's stream and a CUDA event marks readiness; the
engine flips only once the event has completed. On CPU the copy is synchronous.
No allocation happens here: slots were preallocated when the draft was built.
"""
from __future__ import annotations

import torch


@torch.no_grad()
def copy_into(dst: torch.nn.Module, src: torch.nn.Module) -> None:
    for (name, d), (_, s) in zip(dst.state_dict().items(), src.state_dict().items()):
        d.copy_(s.to(d.dtype), non_blocking=True)


def all_finite(module: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in module.state_dict().values() if t.is_floating_point())


def publish(proposer, src: torch.nn.Module, version: int, stream=None) -> None:
    """Write `src` into the proposer's inactive slot and stage it for the next flip."""
    if not all_finite(src):
        raise FloatingPointError("refusing to publish non-finite draft weights")
    event = None
    slot = proposer.begin_write()
    if stream is not None:
        with torch.cuda.stream(stream):
            copy_into(slot, src)
            event = torch.cuda.Event()
            event.record(stream)
    else:
        copy_into(slot, src)
    proposer.stage(version, event)
