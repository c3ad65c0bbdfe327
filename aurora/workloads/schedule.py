"""Request schedules built from the corpora: abrupt domain shifts, mixed traffic, and
tiny prompts for smoke tests. Every schedule is a deterministic function of its seed.

Plot tau against request index and mark `switch_indices(prompts)` to see adaptation.
"""
from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Callable, Sequence

from aurora.workloads.corpora import (
    DEFAULT_MAX_CHARS,
    Prompt,
    load_domain,
    stdlib_snippets,
)


def domain_shift(domains: Sequence[str], per_domain: int, seed: int = 0, cycles: int = 1,
                 max_chars: int = DEFAULT_MAX_CHARS) -> list[Prompt]:
    """`per_domain` requests of each domain in turn, repeated `cycles` times, e.g.
    code x N -> finance x N -> chat x N. No prompt repeats (a domain listed twice, or
    several cycles, draws fresh prompts)."""
    if per_domain < 0 or cycles < 0:
        raise ValueError("per_domain and cycles must be >= 0")
    uses = Counter(domains)
    pools = {d: iter(load_domain(d, per_domain * cycles * k, seed, max_chars))
             for d, k in uses.items()}
    out: list[Prompt] = []
    for _ in range(cycles):
        for d in domains:
            out.extend(next(pools[d]) for _ in range(per_domain))
    return out


def mixed(domains: Sequence[str], n: int, seed: int = 0,
          max_chars: int = DEFAULT_MAX_CHARS) -> list[Prompt]:
    """`n` requests with the domains in (near-)equal shares, shuffled together."""
    if not domains:
        raise ValueError("mixed() needs at least one domain")
    k = len(domains)
    out: list[Prompt] = []
    for i, d in enumerate(domains):
        share = n // k + (1 if i < n % k else 0)
        out.extend(load_domain(d, share, seed, max_chars))
    random.Random(f"mixed:{seed}").shuffle(out)
    return out


def _key_fn(key: str | Callable[[Prompt], object]) -> Callable[[Prompt], object]:
    return key if callable(key) else (lambda p: getattr(p, key))


def switch_indices(prompts: Sequence[Prompt],
                   key: str | Callable[[Prompt], object] = "domain") -> list[int]:
    """Indices i > 0 where `key` (a Prompt field name, or a function) differs from
    request i-1. HumanEval and stdlib are both domain "code": use key="source" to
    separate them."""
    f = _key_fn(key)
    return [i for i in range(1, len(prompts)) if f(prompts[i]) != f(prompts[i - 1])]


def segments(prompts: Sequence[Prompt],
             key: str | Callable[[Prompt], object] = "domain") -> list[tuple[int, int, object]]:
    """(start, stop, label) runs of equal `key`, for shading phases on a plot."""
    f = _key_fn(key)
    bounds = [0] + switch_indices(prompts, f) + [len(prompts)]
    return [(a, b, f(prompts[a])) for a, b in itertools.pairwise(bounds) if a < b]


def tiny_prompts(n: int, seed: int = 0, max_chars: int = 200) -> list[Prompt]:
    """`n` short real prompts (stdlib function heads cut to <= `max_chars` at a line
    boundary) for smoke tests on tiny models."""
    out = []
    for p in stdlib_snippets(n, seed, body_lines=2, max_lines=8, max_chars=4 * max_chars):
        text, size = "", 0
        for line in p.text.splitlines(keepends=True):
            if size + len(line) > max_chars:
                break
            text, size = text + line, size + len(line)
        text = text or p.text[:max_chars]
        out.append(Prompt(text, p.domain, p.source, ref=p.ref))
    return out
