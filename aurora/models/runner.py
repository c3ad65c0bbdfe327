"""Target runner: transformers' own modeling code, attention routed to our paged backend.

We register an attention function with transformers' `AttentionInterface`; each layer
hands it only the new tokens' q/k/v (RoPE applied from our position ids). It writes
K/V into the paged pool and attends over cached prefix + the new tokens under the
step's tree mask. Any decoder family transformers supports runs unchanged.
`compile="on"` swaps in the compiled static path (compiled.py), `fast_path` a hand-written
eager step for Llama-structured models (fast_llama.py); this eager path stays the reference.
`quantize="int8"|"int4"` swaps the linear layers for weight-only ones (quant.py).
"""
from __future__ import annotations

import functools
import threading
from dataclasses import dataclass

import torch

from aurora.engine.kv_cache import KVCache
from aurora.kernels import backend, paged_tree_attention

ATTN_NAME = "aurora_paged"
_local = threading.local()


@dataclass
class StepBatch:
    """Flattened inputs of one target forward over many sequences' new tokens."""
    input_ids: torch.Tensor      # [T] int64
    positions: torch.Tensor      # [T] int64
    slot_mapping: torch.Tensor   # [T] int64, flat KV slot each new token writes
    block_tables: torch.Tensor   # [B, max_blocks] int32
    seq_lens: torch.Tensor       # [B] int32, cached + new tokens
    query_start: torch.Tensor    # [B + 1] int32
    tree_mask: torch.Tensor      # [T, max_new] bool
    logits_rows: torch.Tensor    # [R] int64, rows of T that need logits
    # Optional "tail" of the step: nothing reads the final hidden state of rows without logits,
    # so the last decoder layer may attend and run its MLP for the logits rows only (K/V of all
    # rows still go to the cache). Per sequence those rows are a suffix of its new tokens (root
    # + tree nodes), so the tail is itself a valid step: its queries see every earlier key as
    # cached, and each other under tail_tree_mask. None: every row runs every layer.
    tail_query_start: torch.Tensor | None = None   # [B + 1] int32, offsets of each sequence's tail rows
    tail_tree_mask: torch.Tensor | None = None     # [R, max_tail] bool


@dataclass
class StepResult:
    logits: torch.Tensor         # [R, vocab] float32, processed by final softcap if any
    hidden: torch.Tensor | None  # [T, hidden] final (normed) hidden state of every new token
                                 # (None when the step ran its last layer for the tail rows only)
    features: torch.Tensor       # [T, 3 * hidden] low/mid/high layer outputs (draft input)


def _paged_attend(ctx: dict, layer_idx: int, q, k, v, scaling: float, sliding_window=None, softcap=None,
                  tail: bool = False):
    """Write the new tokens' K/V into the pool and attend over prefix + new tokens.
    q: [T, H, D]; k, v: [T, Hkv, D] -> [T, H, D]. tail: q holds the step's tail rows only
    (StepBatch.tail_*, rows `logits_rows`): q [R, H, D] -> [R, H, D], K/V of every row written."""
    batch: StepBatch = ctx["batch"]
    k_pool, v_pool = ctx["cache"].layer(layer_idx)
    k_pool[batch.slot_mapping] = k.to(k_pool.dtype)
    v_pool[batch.slot_mapping] = v.to(v_pool.dtype)
    if tail:
        meta = (batch.tail_query_start, batch.tail_tree_mask, batch.positions[batch.logits_rows])
        plans = ctx.setdefault("tail", {})                            # the tail's own plan
    else:
        meta, plans = (batch.query_start, batch.tree_mask, batch.positions), ctx
    return paged_tree_attention(
        q, k_pool, v_pool, batch.block_tables, batch.seq_lens, *meta, ctx["cache"].block_size, scaling,
        sliding_window, softcap, step_cache=plans, impl=ctx["impl"])


def _aurora_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                      sliding_window=None, softcap=None, **kwargs):
    # query: [1, H, T, D]; key/value: [1, Hkv, T, D]
    out = _paged_attend(_local.ctx, module.layer_idx, query[0].transpose(0, 1), key[0].transpose(0, 1),
                        value[0].transpose(0, 1), scaling if scaling is not None else query.shape[-1] ** -0.5,
                        sliding_window, softcap)
    return out.unsqueeze(0), None                                  # [1, T, H, D]


def _register() -> None:
    from transformers import AttentionInterface
    AttentionInterface.register(ATTN_NAME, _aurora_attention)


def set_attn(model, name: str) -> None:
    """Point the model (and any submodule holding a config copy) at attention `name`."""
    model.config._attn_implementation = name
    for sub in model.modules():   # some families copy the config per submodule
        if hasattr(sub, "config") and hasattr(sub.config, "_attn_implementation"):
            sub.config._attn_implementation = name


class TargetRunner:
    """Owns the target model and its KV pool; `forward(batch)` runs one step."""

    def __init__(self, model, num_blocks: int, block_size: int, compile: str = "off",
                 quantize: str = "none", packed_linears: bool = False, fast_path: bool = False):
        _register()
        if quantize != "none":      # weight-only int8/int4 linear layers (CPU kernels), see quant.py
            from aurora.models.quant import quantize_model
            quantize_model(model, quantize)
        # CPU, bf16 or fp32, eager: linear weights packed once into oneDNN's layout (packed_linear.py)
        self.packed_bytes = 0
        if packed_linears and compile == "off" and next(model.parameters()).device.type == "cpu":
            from aurora.models.packed_linear import pack_linears
            self.packed_bytes = pack_linears(model)
        self.model = model
        cfg = model.config
        self.config = cfg
        set_attn(model, ATTN_NAME)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.num_layers = cfg.num_hidden_layers
        self.hidden_size = cfg.hidden_size
        self.vocab_size = model.get_output_embeddings().out_features
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.cache = KVCache(self.num_layers, num_blocks, block_size, cfg.num_key_value_heads,
                             head_dim, self.dtype, self.device)
        n = self.num_layers
        # EAGLE-3 feature layers: low, middle, high (outputs of these decoder layers).
        self.feature_layers = (min(2, n - 1), n // 2, max(n - 3, 0))
        self.final_softcap = getattr(cfg, "final_logit_softcapping", None)
        self.max_model_len = getattr(cfg, "max_position_embeddings", 2048)
        # the hand-written step for Llama-structured models (fast_llama.py); transformers' forward
        # below stays the reference and serves every other family
        self.fast = None
        if fast_path and compile == "off" and self.device.type == "cpu":   # not yet measured on GPU
            from aurora.models.fast_llama import FastLlama, supports
            if supports(model) is None:
                self.fast = FastLlama(model)
        self.compiled = None
        if compile != "off":        # the static (compiled) path; the eager path above stays the reference
            from aurora.models.compiled import ATTN_NAME as STATIC_NAME, CompiledStep
            set_attn(model, STATIC_NAME)
            self.compiled = CompiledStep(self, compile)

    def warmup(self, max_batch: int, threads: int | None = None) -> None:
        """Compile every graph of the compiled path now (no-op when eager), with the serving
        thread count (inductor's CPU kernels keep the thread count they were compiled with)."""
        if self.compiled is None or self.compiled.mode == "static":
            return
        from aurora.models.compiled import warmup
        before = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            warmup(self, max_batch)
        finally:
            torch.set_num_threads(before)

    @property
    def supports_tail(self) -> bool:
        """Whether `forward` uses a batch's tail (StepBatch.tail_*: the last layer for the logits
        rows only): the hand-written step, when the last layer is not a feature layer (the
        draft's features need its output for every row). Elsewhere a step need not build one."""
        return self.fast is not None and self.num_layers - 1 not in self.feature_layers

    @property
    def lm_head(self) -> torch.nn.Module:
        return self.model.get_output_embeddings()

    @property
    def embed_tokens(self) -> torch.nn.Module:
        return self.model.get_input_embeddings()

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] final hidden -> [N, vocab] float32 logits (the target's p before sampling)."""
        logits = self.lm_head(hidden).float()
        if self.final_softcap:
            logits = self.final_softcap * torch.tanh(logits / self.final_softcap)
        return logits

    @torch.inference_mode()
    def forward(self, batch: StepBatch) -> StepResult:
        if self.compiled is not None:
            return self.compiled(batch)
        ctx = {"batch": batch, "cache": self.cache, "impl": backend(self.device)}
        if self.fast is not None:
            tail = None
            if batch.tail_query_start is not None and self.supports_tail:
                tail = (batch.logits_rows, functools.partial(_paged_attend, ctx, tail=True))
            hidden, features = self.fast.forward(batch.input_ids, batch.positions,
                                                 functools.partial(_paged_attend, ctx), self.feature_layers, tail)
            if tail is not None:                  # hidden: the logits rows' only, in their order
                return StepResult(logits=self.logits_from_hidden(hidden), hidden=None, features=features)
            return StepResult(logits=self.logits_from_hidden(hidden[batch.logits_rows]), hidden=hidden,
                              features=features)
        _local.ctx = ctx
        try:
            out = self.model.model(input_ids=batch.input_ids[None], position_ids=batch.positions[None],
                                   use_cache=False, output_hidden_states=True)
        finally:
            _local.ctx = None
        hidden = out.last_hidden_state[0]                                     # [T, hidden]
        states = out.hidden_states                                            # embeddings + every layer
        features = torch.cat([states[i + 1][0] for i in self.feature_layers], dim=-1)
        logits = self.logits_from_hidden(hidden[batch.logits_rows])
        return StepResult(logits=logits, hidden=hidden, features=features)
