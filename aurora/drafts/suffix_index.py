"""A bounded index over every token this engine has served (prompts and outputs, finished
and in flight), for drafting from what followed the same context in earlier traffic.

Plain Python over flat `array`s, like the block allocator. Tokens live in a ring of slots in
insertion order (absolute position p -> slot p % capacity); `nxt` links a token to the next
token of its request, so requests written concurrently may interleave. For each context
length n in LEVELS, a hash chain (LZ77 style: `head[bucket]` -> newest position, `prev` ->
the previous position whose last n tokens hash alike) finds earlier occurrences of the
current context; `check` (the low 32 hash bits) filters bucket collisions. The byte budget
fixes the capacity; when full the oldest tokens (the oldest requests) are overwritten.
Hash of the n tokens ending at i: H = (P_i - P_{i-n} * B^n) mod M with prefix hashes
P_i = P_{i-1} * B + t_i + 1 (mod M = 2^61 - 1): stable across processes, so it persists.
"""
from __future__ import annotations

import heapq
import json
import math
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

LEVELS = (1, 2, 3, 4, 6, 8, 12, 16)     # context lengths indexed (match lengths)
MOD = (1 << 61) - 1
BASE = 1_000_003
MASK32 = 0xFFFFFFFF
MIN_BUCKETS = 1 << 10
MIN_SLOTS = 1 << 12
FORMAT = "aurora-suffix-v1"


def _slot_bytes(num_levels: int) -> int:
    return 4 + 4 + num_levels * (4 + 4)      # tok, nxt, then prev + check per level


@dataclass
class Cursor:
    """Write position of one request (a sequence in flight): its last absolute position,
    its recent prefix hashes, and the hash of its context at every level (None if shorter)."""
    num_tokens: int = 0                      # tokens of the request inserted so far
    last: int = -1                           # absolute position of its newest token
    prefix: list[int] = field(default_factory=lambda: [0])
    keys: list[int | None] = field(default_factory=list)


@dataclass
class Match:
    length: int                              # context length matched (a level), 0 = none
    positions: list[int]                     # absolute positions where that context ended, newest first


class SuffixIndex:
    def __init__(self, max_bytes: int = 64 << 20, levels: tuple[int, ...] = LEVELS,
                 max_occurrences: int = 64, max_walk: int = 512):
        if not levels or list(levels) != sorted(set(levels)) or levels[0] < 1:
            raise ValueError("levels must be increasing context lengths >= 1")
        self.levels = tuple(levels)
        self.max_bytes = int(max_bytes)
        self.max_occurrences, self.max_walk = max_occurrences, max_walk
        num = len(levels)
        # capacity C and the largest head table B (a power of two ~ C / 2) so that the
        # arrays at full size fit the budget: C * slot_bytes + num * 8 * B <= max_bytes
        per_token = _slot_bytes(num) + num * 4
        cap = self.max_bytes // per_token
        self.max_buckets = max(MIN_BUCKETS, 1 << max(0, (cap // 2).bit_length() - 1))
        self.capacity = (self.max_bytes - num * 8 * self.max_buckets) // _slot_bytes(num)
        if self.capacity < MIN_SLOTS:
            raise ValueError(f"suffix index budget {max_bytes} bytes is too small (need >= "
                             f"{MIN_SLOTS * per_token + num * 8 * MIN_BUCKETS})")
        self._pow = [pow(BASE, n, MOD) for n in self.levels]
        self.lo = 0                              # oldest live absolute position
        self.hi = 0                              # next absolute position to write
        self.num_requests = 0                    # cursors ever opened
        self._alloc(min(MIN_SLOTS, self.capacity), MIN_BUCKETS)

    # ---------------------------------------------------------------- storage
    def _alloc(self, slots: int, buckets: int) -> None:
        num = len(self.levels)
        self.tok = array("i", bytes(4 * slots))
        self.nxt = array("i", bytes(4 * slots))
        self.prev = [array("i", bytes(4 * slots)) for _ in range(num)]
        self.check = [array("I", bytes(4 * slots)) for _ in range(num)]
        self.head = [array("q", [-1]) * buckets for _ in range(num)]
        self.mask = buckets - 1

    @property
    def nbytes(self) -> int:
        arrays = [self.tok, self.nxt, *self.prev, *self.check, *self.head]
        return sum(a.itemsize * len(a) for a in arrays)

    @property
    def num_tokens(self) -> int:
        return self.hi - self.lo

    def _grow(self) -> None:
        """Double the slot arrays (before the ring first wraps) and, with them, the head tables."""
        old = len(self.tok)
        new = min(2 * old, self.capacity)
        pad = bytes(4 * (new - old))
        for arr in [self.tok, self.nxt, *self.prev, *self.check]:
            arr.frombytes(pad)
        buckets = min(self.max_buckets, max(MIN_BUCKETS, 1 << max(0, (new // 2).bit_length() - 1)))
        if buckets > self.mask + 1:
            self._rehash(buckets)

    def _rehash(self, buckets: int) -> None:
        """Rebuild heads and chains for a bigger head table from the stored check hashes (the
        bucket is their low bits; check 0 = not chained). Vectorised; only before the ring wraps."""
        mask = buckets - 1
        pos = np.arange(self.hi, dtype=np.int64)
        for li in range(len(self.levels)):
            chk = np.frombuffer(self.check[li], dtype=np.uint32)[:self.hi].astype(np.int64)
            sel = pos[chk != 0]
            b = chk[sel] & mask
            order = np.lexsort((sel, b))
            sp, sb = sel[order], b[order]
            same = np.zeros(len(sp), dtype=bool)
            same[1:] = sb[1:] == sb[:-1]
            prev = np.zeros(len(self.tok), dtype=np.int32)
            prev[sp[same]] = (sp[same] - np.roll(sp, 1)[same]).astype(np.int32)
            head = np.full(buckets, -1, dtype=np.int64)
            newest = np.ones(len(sp), dtype=bool)
            newest[:-1] = sb[1:] != sb[:-1]
            head[sb[newest]] = sp[newest]
            self.prev[li] = array("i", prev.tobytes())
            self.head[li] = array("q", head.tobytes())
        self.mask = mask

    # ---------------------------------------------------------------- writing
    def open(self) -> Cursor:
        self.num_requests += 1
        return Cursor(keys=[None] * len(self.levels))

    def extend(self, cur: Cursor, token_ids) -> None:
        """Index tokens of the request behind `cur` (visible to every query at once)."""
        levels = tuple(enumerate(self.levels))
        pows, prevs, checks, heads = self._pow, self.prev, self.check, self.head
        tok, nxt, cap = self.tok, self.nxt, self.capacity
        keys, prefix = cur.keys, cur.prefix
        keep = self.levels[-1] + 1
        for t in token_ids:
            p = self.hi
            if p >= len(tok) and len(tok) < cap:
                self._grow()
                tok, nxt, prevs, heads = self.tok, self.nxt, self.prev, self.head
            if p - self.lo >= cap:
                self.lo = p - cap + 1              # overwrite the oldest token
            lo, mask = self.lo, self.mask
            s = p % cap
            tok[s] = t
            nxt[s] = 0
            if cur.last >= lo:
                nxt[cur.last % cap] = p - cur.last
            h_all = (prefix[-1] * BASE + t + 1) % MOD
            prefix.append(h_all)
            if len(prefix) > keep:
                del prefix[0]
            size = len(prefix)
            for li, n in levels:
                if size <= n:
                    keys[li] = None
                    prevs[li][s] = 0
                    checks[li][s] = 0
                    continue
                h = (h_all - prefix[-1 - n] * pows[li]) % MOD
                keys[li] = h
                chk = (h & MASK32) or 1          # 0 marks "not chained"
                b = chk & mask
                head = heads[li]
                old = head[b]
                prevs[li][s] = p - old if old >= lo else 0
                checks[li][s] = chk
                head[b] = p
            cur.last = p
            cur.num_tokens += 1
            self.hi = p + 1

    def append(self, cur: Cursor, token_id: int) -> None:
        self.extend(cur, (token_id,))

    # ---------------------------------------------------------------- reading
    def match(self, cur: Cursor) -> Match:
        """Earlier occurrences (with a continuation) of the longest indexed context of `cur`'s
        request: the deepest level with any, newest first, at most `max_occurrences`."""
        tok_nxt, lo, cap = self.nxt, self.lo, self.capacity
        for li in range(len(self.levels) - 1, -1, -1):
            h = cur.keys[li] if li < len(cur.keys) else None
            if h is None:
                continue
            chk = (h & MASK32) or 1
            check, prev = self.check[li], self.prev[li]
            p = self.head[li][chk & self.mask]
            found: list[int] = []
            for _ in range(self.max_walk):
                if p < lo:
                    break
                s = p % cap
                if check[s] == chk and tok_nxt[s]:
                    found.append(p)
                    if len(found) >= self.max_occurrences:
                        break
                d = prev[s]
                if not d:
                    break
                p -= d
            if found:
                return Match(self.levels[li], found)
        return Match(0, [])

    def continuations(self, positions: list[int]) -> list[tuple[int, list[int]]]:
        """Group the tokens following `positions` by token id: [(token, next positions)],
        most frequent first (ties: the newest occurrence first)."""
        groups: dict[int, list[int]] = {}
        tok, nxt, cap = self.tok, self.nxt, self.capacity
        for p in positions:
            d = nxt[p % cap]
            if d:
                q = p + d
                groups.setdefault(tok[q % cap], []).append(q)
        return sorted(groups.items(), key=lambda kv: -len(kv[1]))

    def speculate(self, cur: Cursor, max_nodes: int, max_depth: int, min_prob: float = 0.1,
                  spec_factor: float = 1.0) -> tuple[list[int], list[int], list[float], int, list[int]]:
        """A draft tree from what followed the matched context: best-first by path frequency
        (product of child count / parent count along the path), children ranked by count,
        at most ceil(spec_factor * match length) nodes (a short match is weak evidence: few
        nodes, cheap to verify), depth <= max_depth, nodes whose path frequency < min_prob cut.
        Returns (token_ids, parents, path_probs, match_length, supports); parents precede
        children; supports[i] = earlier occurrences whose continuation is node i's whole path."""
        m = self.match(cur)
        max_nodes = min(max_nodes, math.ceil(spec_factor * m.length))
        if not m.positions or max_nodes < 1:
            return [], [], [], m.length, []
        depth_cap = max(1, min(max_depth, max_nodes))
        tokens, parents, probs, supports = [], [], [], []
        heap = [(-1.0, 0, -1, 0, m.positions)]   # (-path prob, tie, parent node, depth, positions)
        tie = 1
        while heap and len(tokens) < max_nodes:
            neg, _, node, depth, positions = heapq.heappop(heap)
            if depth >= depth_cap:
                continue
            total = len(positions)
            for token, nexts in self.continuations(positions):
                prob = -neg * len(nexts) / total
                if prob < min_prob:
                    break                             # sorted by count: the rest are rarer
                child = len(tokens)
                tokens.append(token)
                parents.append(node)
                probs.append(prob)
                supports.append(len(nexts))
                heapq.heappush(heap, (-prob, tie, child, depth + 1, nexts))
                tie += 1
                if len(tokens) >= max_nodes:
                    break
        return tokens, parents, probs, m.length, supports

    def sample_tree(self, cur: Cursor, max_nodes: int, max_depth: int, spec_factor: float, root_draws: int,
                    generator=None) -> tuple[list[int], list[int], list[int], list[list[tuple[int, float]]]]:
        """A sampled draft tree with a proper q: at each expanded node, q = the frequencies of what
        followed it (count / total); its children are i.i.d. draws from q (with replacement, never
        selected by value: `root_draws` at the root, one below), so recursive rejection sampling
        stays lossless. Node budget as `speculate`. Returns (token_ids, parents, q_rows, dists)
        with dists[row] = [(token, q)] and q_rows[i] the row node i was drawn from."""
        import torch
        m = self.match(cur)
        max_nodes = min(max_nodes, math.ceil(spec_factor * m.length))
        tokens, parents, q_rows, dists = [], [], [], []
        if not m.positions or max_nodes < 1:
            return tokens, parents, q_rows, dists
        depth_cap = max(1, min(max_depth, max_nodes))
        frontier = [(-1, 0, m.positions)]          # (node, depth, positions), breadth first
        while frontier and len(tokens) < max_nodes:
            node, depth, positions = frontier.pop(0)
            if depth >= depth_cap:
                continue
            groups = self.continuations(positions)
            if not groups:
                continue
            total = sum(len(n) for _, n in groups)
            row = len(dists)
            dists.append([(tok, len(n) / total) for tok, n in groups])
            draws = min(root_draws if node < 0 else 1, max_nodes - len(tokens))
            weights = torch.tensor([len(n) for _, n in groups], dtype=torch.float64)
            for i in torch.multinomial(weights, draws, replacement=True, generator=generator).tolist():
                tok, nexts = groups[i]
                frontier.append((len(tokens), depth + 1, nexts))
                tokens.append(tok)
                parents.append(node)
                q_rows.append(row)
        return tokens, parents, q_rows, dists

    # ---------------------------------------------------------------- persistence
    def state_dict(self) -> dict:
        return {"tok": self.tok, "nxt": self.nxt, **{f"prev{i}": a for i, a in enumerate(self.prev)},
                **{f"check{i}": a for i, a in enumerate(self.check)},
                **{f"head{i}": a for i, a in enumerate(self.head)}}

    def save(self, path: str | Path) -> Path:
        """Write the index under `path` (index.json + index.npz). It holds user text (token ids
        of every prompt and output indexed): treat the files like request logs."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        arrays = {k: np.frombuffer(a, dtype=np.dtype(a.typecode)) for k, a in self.state_dict().items()}
        np.savez(path / "suffix_index.npz", **arrays)
        meta = {"format": FORMAT, "levels": list(self.levels), "max_bytes": self.max_bytes,
                "capacity": self.capacity, "lo": self.lo, "hi": self.hi, "mask": self.mask,
                "num_requests": self.num_requests}
        (path / "suffix_index.json").write_text(json.dumps(meta, indent=2))
        return path

    @classmethod
    def exists(cls, path: str | Path) -> bool:
        path = Path(path).expanduser()
        return (path / "suffix_index.json").exists() and (path / "suffix_index.npz").exists()

    @classmethod
    def load(cls, path: str | Path, max_occurrences: int = 64, max_walk: int = 512) -> "SuffixIndex":
        path = Path(path).expanduser()
        if not cls.exists(path):
            raise ValueError(f"no suffix index at {path} (expected suffix_index.json + suffix_index.npz)")
        meta = json.loads((path / "suffix_index.json").read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not an {FORMAT} index")
        index = cls(meta["max_bytes"], tuple(meta["levels"]), max_occurrences, max_walk)
        if index.capacity != meta["capacity"]:
            raise ValueError(f"{path}: index capacity {meta['capacity']} does not match this build")
        with np.load(path / "suffix_index.npz") as data:
            for key, arr in index.state_dict().items():
                loaded = array(arr.typecode, data[key].astype(np.dtype(arr.typecode)).tobytes())
                name, i = key.rstrip("0123456789"), key[len(key.rstrip("0123456789")):]
                if i:
                    getattr(index, name)[int(i)] = loaded
                else:
                    setattr(index, name, loaded)
        index.lo, index.hi, index.mask = meta["lo"], meta["hi"], meta["mask"]
        index.num_requests = meta["num_requests"]
        return index
