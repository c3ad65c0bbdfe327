"""A small causal LM sharing the target's tokenizer as the draft (chain proposals).

It re-reads the last `WINDOW` context tokens each step (no draft KV cache: simple, and
cheap for the small drafts this is meant for), all sequences of a step in one batched forward
per depth, and extends a chain greedily or by sampling from its processed distribution
(recorded as q for lossless verification).
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
        """One chain per sequence, all sequences in one forward per depth level: the windows are
        right-padded into [B, L] with an attention mask, so each row's last real position sees only
        its own tokens (causal), and its logits are read there."""
        if not seqs:
            return []
        depth = ctx.spec.depth if ctx.spec.shape == "chain" else min(ctx.spec.depth, ctx.spec.max_nodes)
        dev = next(self.model.parameters()).device
        windows = [list(seq.token_ids[-WINDOW:]) for seq in seqs]
        trees = [DraftTree() for _ in seqs]
        parents = [-1] * len(seqs)
        q_lists: list[list[torch.Tensor]] = [[] for _ in seqs]
        for _ in range(depth):
            lengths = [len(w) for w in windows]
            width = max(lengths)
            ids = torch.zeros(len(seqs), width, dtype=torch.long)                       # [B, L]
            mask = torch.zeros(len(seqs), width, dtype=torch.long)                      # [B, L]
            for i, w in enumerate(windows):
                ids[i, :len(w)] = torch.tensor(w)
                mask[i, :len(w)] = 1
            out = self.model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits   # [B, L, V']
            last = out[torch.arange(len(seqs), device=dev), torch.tensor(lengths, device=dev) - 1].float()  # [B, V']
            if last.shape[-1] < ctx.vocab_size:
                last = torch.cat([last, last.new_full((len(seqs), ctx.vocab_size - last.shape[-1]), float("-inf"))], -1)
            for i, seq in enumerate(seqs):
                if seq.params.greedy:
                    tok, row, lp = int(last[i].argmax()), -1, 0.0
                else:
                    probs = processed_probs(last[i:i + 1], seq.params)[0].cpu()      # [V]
                    tok = sample(probs, seq.generator)
                    q_lists[i].append(probs)
                    row, lp = len(q_lists[i]) - 1, float(torch.log(probs[tok]))
                parents[i] = trees[i].add(tok, parents[i], lp, row)
                windows[i] = (windows[i] + [tok])[-WINDOW:]
        for tree, q_list in zip(trees, q_lists):
            if q_list:
                tree.q_probs = torch.stack(q_list)
        return trees
