"""Speed and memory of the suffix index: insertion per token and drafting per sequence with
~1M indexed tokens of real text (stdlib source + ShareGPT, SmolLM2 tokenizer), plus bytes per
indexed token. Targets: propose <= 1 ms per sequence per step, insert <= 20 us per token.

    python examples/suffix_index_bench.py [--tokens 1000000] [--bytes 128MiB]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import sysconfig
import time
from pathlib import Path

from aurora.drafts.suffix_index import SuffixIndex


def real_requests(tokenizer, num_tokens: int) -> list[list[int]]:
    """Requests of real token ids: stdlib files cut into ~400-token pieces, then ShareGPT turns."""
    out, total = [], 0
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if "test" in path.parts or "site-packages" in path.parts:
            continue
        try:
            ids = tokenizer.encode(path.read_text(encoding="utf-8"), add_special_tokens=False)
        except (UnicodeDecodeError, OSError):
            continue
        for i in range(0, len(ids), 400):
            out.append(ids[i:i + 400])
            total += len(out[-1])
        if total >= num_tokens:
            break
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--mib", type=int, default=128, help="index byte budget in MiB")
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--max-nodes", type=int, default=16)
    args = ap.parse_args(argv)

    from aurora.bench.systems import load_tokenizer
    tok = load_tokenizer("smollm2-135m")
    t0 = time.perf_counter()
    requests = real_requests(tok, args.tokens)
    print(f"tokenized {sum(map(len, requests))} tokens in {len(requests)} requests "
          f"({time.perf_counter() - t0:.1f} s)")

    index = SuffixIndex(args.mib << 20)
    held_out = requests[-50:]                        # queried, never inserted
    timings = []
    t_all, cpu_all = time.perf_counter(), time.process_time()
    for ids in requests[:-50]:
        cur = index.open()
        t0 = time.perf_counter()
        index.extend(cur, ids)
        timings.append((time.perf_counter() - t0) / max(1, len(ids)))
    total, cpu = time.perf_counter() - t_all, time.process_time() - cpu_all
    n = index.num_tokens
    print(f"indexed {n} tokens (capacity {index.capacity}); insert: mean {1e6 * total / max(1, n):.2f} us/token wall, "
          f"{1e6 * cpu / max(1, n):.2f} us/token CPU time, median per request {1e6 * statistics.median(timings):.2f} "
          f"us/token wall (all incl. head-table growth)")
    print(f"memory: {index.nbytes / 2**20:.1f} MiB arrays = {index.nbytes / max(1, n):.1f} bytes per indexed token "
          f"(budget {args.mib} MiB, bound holds: {index.nbytes <= index.max_bytes})")

    # drafting: a sequence in flight (its own cursor) at positions of held-out and indexed text
    sources = held_out + requests[:50]
    lat, sizes, cpu_lat = [], [], []
    for q in range(args.queries):
        ids = sources[q % len(sources)]
        cut = 20 + (q * 37) % max(1, len(ids) - 20)
        cur = index.open()
        index.extend(cur, ids[max(0, cut - 32):cut])
        t0, c0 = time.perf_counter(), time.process_time()
        tokens = index.speculate(cur, args.max_nodes, 16, 0.1, 1.0)[0]
        lat.append(time.perf_counter() - t0)
        cpu_lat.append(time.process_time() - c0)
        sizes.append(len(tokens))
    lat.sort()
    print(f"propose (speculate, max_nodes {args.max_nodes}): median {1e6 * lat[len(lat) // 2]:.0f} us, "
          f"p90 {1e6 * lat[int(0.9 * len(lat))]:.0f} us, max {1e6 * lat[-1]:.0f} us per sequence; "
          f"mean tree {statistics.mean(sizes):.1f} nodes; mean CPU time {1e6 * statistics.mean(cpu_lat):.0f} us")
    print(f"machine: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f} (shared: absolute times are noisy)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
