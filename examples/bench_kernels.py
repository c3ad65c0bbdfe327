"""Benchmark the attention kernels: measured, not assumed.

Serving (paged tree attention), per (tree size, prefix length): the Triton kernel; the
pure-torch reference; gathering the paged KV into contiguous tensors; SDPA with a dense mask
and FlexAttention with a block mask on the gathered KV. Training (packed trees, forward +
backward): SDPA with a dense mask vs FlexAttention. Medians of CUDA-event timings after
warm-up, printed as Markdown tables; `--out` writes JSON. Without CUDA it runs a tiny sanity
comparison (Triton under the interpreter) instead; its times mean nothing.

    python examples/bench_kernels.py [--out bench.json] [--quick] [--no-flex]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings

import torch

CUDA = torch.cuda.is_available()
if not CUDA:  # the interpreter must be chosen before triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F
from aurora.kernels.reference import paged_tree_attention_ref, tree_attention_dense_ref
from aurora.kernels.train_attention import (
    cuda_kernel_options,
    tree_attention_flex,
    tree_block_mask,
)
from aurora.kernels.tree_attention_triton import paged_tree_attention_triton
from torch.nn.attention.flex_attention import flex_attention


def timed(fn, warmup: int, reps: int) -> float:
    """Median milliseconds of `fn()`."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if CUDA:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def random_tree_mask(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, n] ancestor-or-self mask of a random tree (parents precede children), node depths."""
    mask = torch.eye(n, dtype=torch.bool)
    depth = torch.zeros(n, dtype=torch.long)
    for i in range(1, n):
        p = int(torch.randint(0, i, (1,), generator=gen))
        mask[i] |= mask[p]
        depth[i] = depth[p] + 1
    return mask, depth


def paged_case(batch, prefix, tree, num_heads, num_kv_heads, head_dim, dtype, device, block_size=16):
    """Every sequence: `prefix` cached keys + a random tree of `tree` new tokens, in scattered blocks."""
    gen = torch.Generator().manual_seed(prefix * 131 + tree)
    seq_len = prefix + tree
    blocks_per_seq = -(-seq_len // block_size)
    pool = batch * blocks_per_seq
    block_tables = torch.randperm(pool, generator=gen).view(batch, blocks_per_seq).int()
    masks, positions = zip(*(random_tree_mask(tree, gen) for _ in range(batch)))
    return {
        "q": torch.randn(batch * tree, num_heads, head_dim, generator=gen).to(device, dtype),
        "k_cache": torch.randn(pool * block_size, num_kv_heads, head_dim, generator=gen).to(device, dtype),
        "v_cache": torch.randn(pool * block_size, num_kv_heads, head_dim, generator=gen).to(device, dtype),
        "block_tables": block_tables.to(device),
        "seq_lens": torch.full((batch,), seq_len, dtype=torch.int32, device=device),
        "query_start": torch.arange(0, batch * tree + 1, tree, dtype=torch.int32, device=device),
        "tree_mask": torch.cat(masks).to(device),
        "positions": (torch.cat(positions) + prefix).to(device),
        "block_size": block_size,
        "scale": head_dim ** -0.5,
    }


def gather_kv(args, expand: bool):
    """Paged pool -> contiguous [B, H or Hkv, S, D] (what SDPA / Flex need first)."""
    batch, block_size = args["block_tables"].shape[0], args["block_size"]
    seq_len = int(args["seq_lens"][0])
    offs = torch.arange(block_size, device=args["q"].device)
    slots = (args["block_tables"].long()[:, :, None] * block_size + offs).view(batch, -1)[:, :seq_len]
    group = args["q"].shape[1] // args["k_cache"].shape[1]
    out = []
    for cache in (args["k_cache"], args["v_cache"]):
        kv = cache[slots].transpose(1, 2)                             # [B, Hkv, S, D]
        out.append(kv.repeat_interleave(group, dim=1) if expand and group > 1 else kv.contiguous())
    return out


def dense_inputs(args):
    """Queries [B, H, T, D] and the dense mask [B, T, S]: prefix visible, tree part per tree_mask."""
    batch = args["block_tables"].shape[0]
    seq_len = int(args["seq_lens"][0])
    tree = args["q"].shape[0] // batch
    q = args["q"].view(batch, tree, *args["q"].shape[1:]).transpose(1, 2)
    mask = torch.ones(batch, tree, seq_len, dtype=torch.bool, device=q.device)
    mask[:, :, seq_len - tree:] = args["tree_mask"].view(batch, tree, tree)
    return q, mask


def compiled_flex():
    if not CUDA:
        return flex_attention  # eager (unfused) on CPU
    import torch._dynamo
    for knob in ("recompile_limit", "cache_size_limit"):  # one compile per shape, no eager fallback
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 256)
    return torch.compile(flex_attention, dynamic=False)


def paged_row(cfg, prefix, tree, flex, warmup, reps) -> dict:
    args = paged_case(cfg["batch"], prefix, tree, cfg["heads"], cfg["kv_heads"], cfg["head_dim"],
                      cfg["dtype"], cfg["device"])
    q, mask = dense_inputs(args)                                      # [B, H, T, D], [B, T, S]
    k_full, v_full = gather_kv(args, expand=True)                     # [B, H, S, D]
    k_kv, v_kv = gather_kv(args, expand=False)                        # [B, Hkv, S, D]
    scale = args["scale"]

    def sdpa():
        return F.scaled_dot_product_attention(q, k_full, v_full, attn_mask=mask[:, None], scale=scale)

    row = {"tree": tree, "prefix": prefix}
    row["triton_ms"] = timed(lambda: paged_tree_attention_triton(**args), warmup, reps)
    row["ref_ms"] = timed(lambda: paged_tree_attention_ref(**args), warmup, reps)
    row["gather_ms"] = timed(lambda: gather_kv(args, expand=True), warmup, reps)
    row["gather_kv_ms"] = timed(lambda: gather_kv(args, expand=False), warmup, reps)
    row["sdpa_ms"] = timed(sdpa, warmup, reps)
    want = F.scaled_dot_product_attention(q.float(), k_full.float(), v_full.float(),
                                          attn_mask=mask[:, None], scale=scale)
    batch, heads, tree_len, head_dim = q.shape
    got = paged_tree_attention_triton(**args).view(batch, tree_len, heads, head_dim).transpose(1, 2)
    row["triton_max_err"] = (got.float() - want).abs().max().item()
    if flex is not None:
        t0 = time.perf_counter()
        block_mask = tree_block_mask(mask)

        def run_flex():
            return flex(q, k_kv, v_kv, block_mask=block_mask, scale=scale, enable_gqa=True,
                        kernel_options=cuda_kernel_options() if CUDA else None)

        run_flex()
        if CUDA:
            torch.cuda.synchronize()
        row["flex_first_call_s"] = time.perf_counter() - t0          # includes the compile
        row["flex_mask_ms"] = timed(lambda: tree_block_mask(mask), warmup, reps)
        row["flex_ms"] = timed(run_flex, warmup, reps)
        row["flex_max_err"] = (run_flex().float() - want).abs().max().item()
    return row


def bench_paged(cfg, trees, prefixes, use_flex, warmup, reps):
    flex = compiled_flex() if use_flex else None
    rows = []
    for prefix in prefixes:
        for tree in trees:
            rows.append(paged_row(cfg, prefix, tree, flex, warmup, reps))
            print(f"  tree {tree:3d} prefix {prefix:5d}: triton {rows[-1]['triton_ms']:.3f} ms", file=sys.stderr)
    return rows


def train_row(cfg, context, tree, use_flex, warmup, reps) -> dict:
    """Forward + backward over packed trees: context (causal) + a random tree per sequence."""
    gen = torch.Generator().manual_seed(context)
    length = context + tree
    mask = torch.zeros(cfg["batch"], length, length, dtype=torch.bool)
    mask[:, :, :context] = torch.tril(torch.ones(length, context, dtype=torch.bool))
    for b in range(cfg["batch"]):
        mask[b, context:, context:] = random_tree_mask(tree, gen)[0]
    mask = mask.to(cfg["device"])                                     # [B, L, L]
    shape = (cfg["batch"], cfg["heads"], length, cfg["head_dim"])
    kv_shape = (cfg["batch"], cfg["kv_heads"], length, cfg["head_dim"])
    q, k, v = (torch.randn(s, generator=gen).to(cfg["device"], cfg["dtype"]).requires_grad_(True)
               for s in (shape, kv_shape, kv_shape))
    scale = cfg["head_dim"] ** -0.5

    def step(attention, **kw):
        attention(q, k, v, mask, scale, **kw).float().square().mean().backward()

    row = {"context": context, "tree": tree}
    row["sdpa_fwd_bwd_ms"] = timed(lambda: step(tree_attention_dense_ref), warmup, reps)
    if use_flex and CUDA:  # no FlexAttention backward on CPU
        t0 = time.perf_counter()
        block_mask = tree_block_mask(mask)
        step(tree_attention_flex, block_mask=block_mask)
        torch.cuda.synchronize()
        row["flex_first_call_s"] = time.perf_counter() - t0          # includes the compile
        row["flex_fwd_bwd_ms"] = timed(lambda: step(tree_attention_flex, block_mask=block_mask), warmup, reps)
        row["flex_mask_ms"] = timed(lambda: tree_block_mask(mask), warmup, reps)
    return row


def _fmt(x, digits=3):
    return "-" if x is None else f"{x:.{digits}f}"


def paged_table(rows) -> str:
    lines = [("| tree | prefix | triton ms | ref ms | gather ms | sdpa ms | flex ms | flex mask ms "
              "| (gather+sdpa)/triton | (gather_kv+flex)/triton | ref/triton | triton err |"),
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        t = r["triton_ms"]
        flex = r.get("flex_ms")
        lines.append(
            f"| {r['tree']} | {r['prefix']} | {_fmt(t)} | {_fmt(r['ref_ms'])} | {_fmt(r['gather_ms'])} "
            f"| {_fmt(r['sdpa_ms'])} | {_fmt(flex)} | {_fmt(r.get('flex_mask_ms'))} "
            f"| {_fmt((r['gather_ms'] + r['sdpa_ms']) / t, 2)} "
            f"| {_fmt(None if flex is None else (r['gather_kv_ms'] + flex) / t, 2)} "
            f"| {_fmt(r['ref_ms'] / t, 2)} | {r['triton_max_err']:.1e} |")
    return "\n".join(lines)


def train_table(rows) -> str:
    lines = ["| context | tree | sdpa fwd+bwd ms | flex fwd+bwd ms | flex mask ms | sdpa/flex | flex first call s |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        flex = r.get("flex_fwd_bwd_ms")
        lines.append(f"| {r['context']} | {r['tree']} | {_fmt(r['sdpa_fwd_bwd_ms'])} | {_fmt(flex)} "
                     f"| {_fmt(r.get('flex_mask_ms'))} "
                     f"| {_fmt(None if flex is None else r['sdpa_fwd_bwd_ms'] / flex, 2)} "
                     f"| {_fmt(r.get('flex_first_call_s'), 1)} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write results as JSON here")
    parser.add_argument("--quick", action="store_true", help="fewer shapes (GPU)")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention (no compiles)")
    opts = parser.parse_args()

    if CUDA:
        device_name = torch.cuda.get_device_name()
        cfg = {"batch": 8, "heads": 32, "kv_heads": 8, "head_dim": 128, "dtype": torch.bfloat16, "device": "cuda"}
        trees, prefixes = ([8, 64], [512, 8192]) if opts.quick else ([8, 16, 32, 64], [512, 2048, 8192])
        contexts, warmup, reps = ([512, 2048] if not opts.quick else [1024]), 5, 20
    else:
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        device_name = "CPU (no CUDA): tiny sanity comparison, Triton under the interpreter; times mean nothing"
        print(f"No CUDA device: {device_name}.", file=sys.stderr)
        cfg = {"batch": 2, "heads": 4, "kv_heads": 2, "head_dim": 32, "dtype": torch.float32, "device": "cpu"}
        trees, prefixes, contexts, warmup, reps = [4, 8], [20, 37], [24], 0, 1

    print(f"{'GPU' if CUDA else 'Device'}: {device_name}\ntorch {torch.__version__}, config {cfg}\n")
    paged = bench_paged(cfg, trees, prefixes, not opts.no_flex, warmup, reps)
    print("### Paged tree attention (serving)\n")
    print(paged_table(paged))
    train = [train_row(cfg, context, 64 if CUDA else 8, not opts.no_flex, warmup, reps) for context in contexts]
    print("\n### Packed-tree attention, forward + backward (training)\n")
    print(train_table(train))
    if not CUDA:
        worst = max(max(r["triton_max_err"], r.get("flex_max_err", 0.0)) for r in paged)
        assert worst < 1e-4, f"sanity comparison failed: max error {worst}"
        print(f"\nSanity: Triton (interpreter) and Flex (eager) agree with SDPA, max error {worst:.1e}.")
    if opts.out:
        import triton
        with open(opts.out, "w") as f:
            json.dump({"device": device_name, "torch": torch.__version__, "triton": triton.__version__,
                           "config": {k: str(v) for k, v in cfg.items()}, "paged": paged, "train": train}, f, indent=1)


if __name__ == "__main__":
    main()
