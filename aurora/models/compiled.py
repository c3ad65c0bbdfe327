"""Compiled target step: the whole forward of a step (transformers modeling code, our static
paged attention, the LM head over the rows that need logits) traced as one graph.

CPU: torch.compile (inductor). The token, query and context dimensions are marked dynamic and
duck sizing is off, so changing prefix lengths, tree sizes and batch never recompile; sizes of 1
specialise, giving at most four graphs (decode / multi-token x one / many sequences), compiled at
start-up by `warmup`. CUDA: the same graph under mode="reduce-overhead" (CUDA graphs), with
shapes padded to buckets so that each bucket is captured once. The graph returns the step's new
K/V; they are written to the paged pool after it in two ops, so the graph mutates nothing.
"""
from __future__ import annotations

import logging
import time

import torch

from aurora.kernels.paged_attention_static import paged_attention_static, plan_static

log = logging.getLogger("aurora.models")
ATTN_NAME = "aurora_static"
CUDA_KV_BUCKET = 256          # CUDA graphs: cached keys padded to a multiple (one capture per bucket)
CUDA_Q_BUCKET = 4             # ... and queries per sequence
CUDA_GRAPH_MAX_TOKENS = 512   # steps with more new tokens (long prefills) run the static path uncompiled
COMPILE_MODES = ("off", "on", "static")   # on: inductor (CPU) / CUDA graphs (CUDA); static: no compiling


def _static_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                      sliding_window=None, softcap=None, aurora_plan=None, aurora_kv=None,
                      aurora_new_kv=None, **kwargs):
    # query: [1, H, T, D]; key/value: [1, Hkv, T, D]; aurora_kv: [layers, 2, slots, Hkv, D]
    k_new, v_new = key[0].transpose(0, 1), value[0].transpose(0, 1)      # [T, Hkv, D]
    aurora_new_kv[module.layer_idx] = (k_new, v_new)
    pool = aurora_kv[module.layer_idx]
    out = paged_attention_static(query[0].transpose(0, 1), k_new.to(pool.dtype), v_new.to(pool.dtype),
                                 pool[0], pool[1], aurora_plan, sliding_window,
                                 scaling if scaling is not None else query.shape[-1] ** -0.5, softcap)
    return out.unsqueeze(0), None                                         # [1, T, H, D]


def _no_mask(*args, **kwargs):
    return None                                                           # our attention builds its own


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(ATTN_NAME, _static_attention)
    AttentionMaskInterface.register(ATTN_NAME, _no_mask)


def num_graphs() -> int:
    """Graphs compiled by dynamo in this process so far (all compiled functions): a difference of
    0 across serving means no recompilation."""
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def model_windows(model) -> tuple:
    """The distinct sliding windows of the model's attention layers (None = full attention)."""
    found = {getattr(m, "sliding_window", None) for m in model.modules() if hasattr(m, "layer_idx")}
    return tuple(sorted(found, key=lambda w: -1 if w is None else w)) or (None,)


class CompiledStep:
    """`step(batch) -> StepResult` through the static path. `mode`: "on" compiles (inductor on CPU,
    CUDA graphs on CUDA); "static" runs the same static path uncompiled (for tests)."""

    def __init__(self, runner, mode: str):
        if mode not in COMPILE_MODES[1:]:
            raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")
        register()
        self.runner = runner
        self.mode = "static" if mode == "static" else ("cuda-graphs" if runner.device.type == "cuda" else "inductor")
        self.model = runner.model
        self.windows = model_windows(self.model)
        self.num_layers = runner.num_layers
        self.num_compiles = 0
        from transformers.utils.output_capturing import maybe_install_capturing_hooks
        maybe_install_capturing_hooks(self.model.model)      # takes a lock: not inside the graph
        # every engine in a process compiles its own graphs of the same code: room for many engines
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 1024)
        if self.mode == "static":
            self._fn = self._forward
        elif self.mode == "inductor":
            self._fn = torch.compile(self._forward, fullgraph=True, dynamic=None)
        else:
            torch._dynamo.mark_static_address(runner.cache.data)   # the pool is never copied into the graph
            self._fn = torch.compile(self._forward, fullgraph=True, mode="reduce-overhead")

    def _forward(self, input_ids, positions, kv, plan):
        new_kv: dict = {}
        out = self.model.model(input_ids=input_ids[None], position_ids=positions[None], use_cache=False,
                               output_hidden_states=True, aurora_plan=plan, aurora_kv=kv,
                               aurora_new_kv=new_kv)
        hidden = out.last_hidden_state[0]                                  # [T, hidden]
        states = out.hidden_states
        features = torch.cat([states[i + 1][0] for i in self.runner.feature_layers], dim=-1)
        k_new = torch.stack([new_kv[i][0] for i in range(self.num_layers)])   # [layers, T, Hkv, D]
        v_new = torch.stack([new_kv[i][1] for i in range(self.num_layers)])
        return hidden, features, k_new, v_new

    def __call__(self, batch):
        from aurora.models.runner import StepResult
        cache = self.runner.cache
        graphs = self.mode == "cuda-graphs"
        plan = plan_static(batch.block_tables, batch.seq_lens, batch.query_start, batch.tree_mask,
                           batch.positions, cache.block_size, self.windows,
                           kv_multiple=CUDA_KV_BUCKET if graphs else cache.block_size,
                           q_multiple=CUDA_Q_BUCKET if graphs else 1)
        num_tokens = batch.input_ids.shape[0]
        args = (batch.input_ids, batch.positions, cache.data, plan)
        fn = self._fn
        if graphs:
            if num_tokens > CUDA_GRAPH_MAX_TOKENS:              # long prefills: not worth a captured graph
                fn = self._forward
            else:
                args = _pad_tokens(args, _next_pow2(num_tokens))
                torch.compiler.cudagraph_mark_step_begin()
        elif self.mode == "inductor":
            _mark_dynamic(args)
        with torch.fx.experimental._config.patch(use_duck_shape=False):
            hidden, features, k_new, v_new = fn(*args)
        if graphs:                      # captured outputs are overwritten by the next replay
            hidden, features = hidden[:num_tokens].clone(), features[:num_tokens].clone()
            k_new, v_new = k_new[:, :num_tokens], v_new[:, :num_tokens]
        cache.data[:, 0, batch.slot_mapping] = k_new.to(cache.data.dtype)
        cache.data[:, 1, batch.slot_mapping] = v_new.to(cache.data.dtype)
        # the LM head runs outside the graph: its row count (1 or tree size) would be one more dim
        logits = self.runner.logits_from_hidden(hidden[batch.logits_rows])
        return StepResult(logits=logits, hidden=hidden, features=features)


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _pad_tokens(args, num_tokens: int):
    """CUDA graphs: pad the packed tokens to a bucket; padded tokens are never queried (q_index
    points at real rows only), their outputs are sliced off and their K/V never written."""
    input_ids, positions, kv, plan = args
    pad = num_tokens - input_ids.shape[0]
    if pad == 0:
        return args
    zeros = input_ids.new_zeros(pad)
    plan = {**plan, "out_index": torch.cat([plan["out_index"], zeros])}
    return torch.cat([input_ids, zeros]), torch.cat([positions, zeros]), kv, plan


def _mark_dynamic(args) -> None:
    input_ids, positions, _, plan = args
    mark = torch._dynamo.maybe_mark_dynamic
    for t in (input_ids, positions, plan["out_index"]):
        mark(t, 0)
    for t in (plan["kv_slots"], plan["q_index"]):
        mark(t, 0)
        mark(t, 1)
    for mask in plan["masks"].values():                 # [B, 1, Q, C + Q]
        for d in (0, 2, 3):
            mark(mask, d)


def synthetic_batch(cache, num_new: list[int], num_cached: int, device):
    """A step over len(num_new) scratch sequences (blocks borrowed from the pool and returned by
    the caller), each with `num_cached` cached tokens and a causal run of num_new[i] new tokens."""
    from aurora.models.runner import StepBatch
    bs = cache.block_size
    blocks = [cache.allocator.allocate(-(-(num_cached + n) // bs)) for n in num_new]
    max_new, total = max(num_new), sum(num_new)
    positions, slots, rows, starts = [], [], [], [0]
    tree_mask = torch.zeros(total, max_new, dtype=torch.bool)
    for ids, n in zip(blocks, num_new):
        pos = range(num_cached, num_cached + n)
        positions += pos
        slots += [ids[p // bs] * bs + p % bs for p in pos]
        tree_mask[starts[-1]:starts[-1] + n, :n] = torch.ones(n, n, dtype=torch.bool).tril_()
        starts.append(starts[-1] + n)
        rows.append(starts[-1] - 1)
    table = torch.zeros(len(num_new), max(len(b) for b in blocks), dtype=torch.int32)
    for i, b in enumerate(blocks):
        table[i, :len(b)] = torch.tensor(b, dtype=torch.int32)

    def t(x, dtype=torch.long):
        return torch.tensor(x, dtype=dtype, device=device)
    batch = StepBatch(input_ids=t([0] * total), positions=t(positions), slot_mapping=t(slots),
                      block_tables=table.to(device), seq_lens=t([num_cached + n for n in num_new], torch.int32),
                      query_start=t(starts, torch.int32), tree_mask=tree_mask.to(device), logits_rows=t(rows))
    return batch, [b for ids in blocks for b in ids]


# Shapes that reach every graph: sizes of 1 specialise (one decode token, one sequence).
WARMUP_SHAPES = ([1], [3], [1, 1], [2, 3])


def warmup(runner, max_batch: int) -> dict:
    """Run every graph shape once (compiles at start-up, not while serving). Returns timings."""
    compiled = runner.compiled
    shapes = [s for s in WARMUP_SHAPES if len(s) <= max_batch]
    times = {}
    for i, num_new in enumerate(shapes):
        t0 = time.perf_counter()
        log.warning("aurora: compiling the target step (%s), shape %d/%d: %d sequence(s), %d new token(s)",
                    compiled.mode, i + 1, len(shapes), len(num_new), sum(num_new))
        for num_cached in (2 * runner.cache.block_size + 1, 3 * runner.cache.block_size + 5):
            batch, blocks = synthetic_batch(runner.cache, num_new, num_cached, runner.device)
            try:
                runner.forward(batch)
            finally:
                runner.cache.allocator.free(blocks)
        times[tuple(num_new)] = time.perf_counter() - t0
    return times
