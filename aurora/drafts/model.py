"""A small causal LM sharing the target's tokenizer as the draft (chain proposals).

It re-reads the last `WINDOW` context tokens each step (no draft KV cache: simple, and
cheap for the small drafts this is meant for) and extends a chain greedily or by
sampling from its processed distribution (recorded as q for lossless verification).
"""
from __future__ import annotations

import torch

from aurora.drafts.base import Proposer
from aurora.engine.sampling import processed_probs, sample
from aurora.engine.tree import DraftTree
from aurora.models.loader import load_model

WINDOW = 128


class ModelProposer(Proposer):
    name = "model"

    def __init__(self, name: str, runner, config):
        model, tok = load_model(name, runner.dtype, runner.device)
        vocab = model.get_output_embeddings().weight.shape[0]
        if vocab > runner.vocab_size:
            raise ValueError(f"draft model {name!r} has vocab {vocab} > target vocab {runner.vocab_size}")
        self.model = model
        self.name = f"model:{name}"

    @torch.inference_mode()
    def propose(self, seqs, ctx):
        return [self._chain(seq, ctx) for seq in seqs]

    def _chain(self, seq, ctx) -> DraftTree:
        tree = DraftTree()
        ids = list(seq.token_ids[-WINDOW:])
        depth = ctx.spec.depth if ctx.spec.shape == "chain" else min(ctx.spec.depth, ctx.spec.max_nodes)
        q_list = []
        parent = -1
        dev = next(self.model.parameters()).device
        for _ in range(depth):
            logits = self.model(torch.tensor([ids], device=dev)).logits[0, -1].float()
            if logits.shape[-1] < ctx.vocab_size:
                logits = torch.cat([logits, logits.new_full((ctx.vocab_size - logits.shape[-1],), float("-inf"))])
            if seq.params.greedy:
                tok, row, lp = int(logits.argmax()), -1, 0.0
            else:
                probs = processed_probs(logits[None], seq.params)[0].cpu()
                tok = sample(probs, seq.generator)
                q_list.append(probs)
                row, lp = len(q_list) - 1, float(torch.log(probs[tok]))
            parent = tree.add(tok, parent, lp, row)
            ids.append(tok)
        if q_list:
            tree.q_probs = torch.stack(q_list)
        return tree
