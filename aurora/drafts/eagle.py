"""The learned draft: an EAGLE-3 head proposing trees, behind double-buffered slots.

Two preallocated heads (slots) hold the serving weights. The trainer writes the
inactive slot and calls `stage(version)`; the engine calls `flip()` between steps, so
a swap is a pointer flip, never a load, and no step sees half-written weights.
`eagle:<dir>` starts from Aurora's checkpoint or an EAGLE-3 draft (legacy or speculators).
"""
from __future__ import annotations

import copy
import logging
import math
import threading

import torch

from aurora.drafts.base import Proposer
from aurora.engine.sampling import draw, processed_probs
from aurora.engine.tree import DraftTree
from aurora.models.eagle import EagleHead, build_head

log = logging.getLogger("aurora.drafts")
SERVE_WINDOW = 48        # context rows the head re-reads each step


class EagleProposer(Proposer):
    name = "eagle"
    learnable = True

    def __init__(self, runner, head: EagleHead, version: int = 0, pretrained: bool = False):
        self.runner = runner
        self.pretrained = pretrained      # loaded from a saved draft: the flywheel keeps its weights
        head = head.to(device=runner.device, dtype=runner.dtype).eval().requires_grad_(False)
        self.slots = [head, copy.deepcopy(head)]
        self.active = 0
        self.version = version
        self._staged: tuple[int, int] | None = None      # (slot, version) ready to flip
        self._lock = threading.Lock()
        self.ready_event = None                          # CUDA event marking the staged slot written
        self._packed = False                             # slots' linears packed (CPU bf16/fp32, see propose)

    @classmethod
    def create(cls, runner, config, checkpoint: str | None = None) -> EagleProposer:
        if checkpoint:
            from aurora.flywheel.checkpoint import load_any
            head, meta = load_any(checkpoint, runner)
            taps = tuple(meta.get("feature_layers") or runner.feature_layers)
            if taps != tuple(runner.feature_layers):
                log.info("eagle draft %s was trained on target layer outputs %s; tapping those instead of %s",
                         checkpoint, taps, runner.feature_layers)
                runner.feature_layers = taps          # features must come from the layers the draft learned on
            return cls(runner, head, version=int(meta.get("version", 0)), pretrained=True)
        return cls(runner, build_head(runner, config.trainer.draft_vocab, config.seed))

    # ------------------------------------------------------------ double buffer
    @property
    def head(self) -> EagleHead:
        return self.slots[self.active]

    def inactive(self) -> EagleHead:
        return self.slots[1 - self.active]

    def begin_write(self) -> EagleHead:
        """Unstage any pending slot (so the engine cannot flip to it mid-write); return it."""
        with self._lock:
            self._staged = None
            self.ready_event = None
            return self.slots[1 - self.active]

    def stage(self, version: int, event=None) -> None:
        """The inactive slot now holds weights of `version`; flip at the next step boundary."""
        with self._lock:
            self._staged = (1 - self.active, version)
            self.ready_event = event

    def flip(self) -> bool:
        with self._lock:
            if self._staged is None:
                return False
            if self.ready_event is not None and not self.ready_event.query():
                return False                             # trainer stream still copying
            self.active, self.version = self._staged
            self._staged = None
            return True

    def _pack_slots(self) -> None:
        """Serve from linear weights packed for oneDNN, as the target does (models/packed_linear.py;
        a hot swap's in-place copy repacks a layer at its next call), q/k/v and gate/up fused into
        one GEMM each. Done at the first proposal, after the flywheel has taken its fp32 training
        copy of the plain head."""
        from aurora.models.packed_linear import pack_linears
        for slot in self.slots:
            pack_linears(slot, calibrate=False)     # the runner's calibration decided for this CPU
            slot.fuse_for_serving()
        self._packed = True

    # ------------------------------------------------------------ proposing
    @torch.inference_mode()
    def propose(self, seqs, ctx):
        """One tree per sequence. All sequences advance together: each head call (context rows,
        logits, one tree level) runs every sequence's rows at once, and a block-diagonal mask
        keeps each sequence's rows to its own context and ancestors."""
        if not self._packed and getattr(self.runner, "packed_bytes", 0):
            self._pack_slots()
        trees = [DraftTree(draft_version=self.version) for _ in seqs]
        live = [i for i, seq in enumerate(seqs) if seq.features is not None and len(seq.features)
                and len(seq.token_ids) == seq.num_cached + 1]
        if live:
            self._grow(self.head, [seqs[i] for i in live], [trees[i] for i in live], ctx.spec, ctx.vocab_size)
        return trees

    def _contexts(self, head: EagleHead, seqs) -> list[tuple]:
        """(K, V, h_last) of each sequence's context rows (positions < P = num_cached), cached
        per sequence: only rows for positions cached since its last step are computed, those of
        all sequences in one head call. A sequence's cache resets on a weight swap."""
        plans = []                                       # (first new position, cached K, cached V)
        for seq in seqs:
            P, first = seq.num_cached, seq.num_cached - len(seq.features)   # first position with a feature
            st = seq.draft_state.get("eagle")
            if st is None or st["version"] != self.version or st["head"] is not head \
                    or not first <= st["end"] <= P or st["end"] == first:
                plans.append((max(first, P - SERVE_WINDOW), None, None))
            else:
                plans.append((st["end"], st["k"], st["v"]))
        out: list[tuple | None] = [None] * len(seqs)
        todo = [i for i, (start, _, _) in enumerate(plans) if start < seqs[i].num_cached]
        if todo:
            pasts = [(plans[i][1], plans[i][2]) for i in todo if plans[i][1] is not None]
            S = sum(k.shape[0] for k, _ in pasts)
            spans, tokens, rows, pos = [], [], [], []    # spans: (past offset, past rows, new offset, new rows)
            past_at = new_at = 0
            for i in todo:
                seq, (start, K, _) = seqs[i], plans[i]
                P = seq.num_cached
                n = P - start
                tokens += seq.token_ids[start + 1:P + 1]
                rows.append(seq.features[len(seq.features) - n:])
                pos.append(torch.arange(start, P))
                pl = 0 if K is None else K.shape[0]
                spans.append((past_at, pl, new_at, n))
                past_at, new_at = past_at + pl, new_at + n
            dev = rows[0].device
            mask = torch.zeros(new_at, S + new_at, dtype=torch.bool, device=dev)   # [N new, S past + N new]
            for po, pl, no_i, n in spans:
                mask[no_i:no_i + n, po:po + pl] = True                     # its own cached rows
                mask[no_i:no_i + n, S + no_i:S + no_i + n] = torch.ones(n, n, dtype=torch.bool, device=dev).tril()
            feats = torch.cat(rows)
            h, K, V = head.rows_step(self.runner.embed_tokens(torch.tensor(tokens, device=dev)),
                                     head.fc(feats.to(head.fc.weight.dtype)), torch.cat(pos).to(dev),
                                     torch.cat([k for k, _ in pasts]) if pasts else None,
                                     torch.cat([v for _, v in pasts]) if pasts else None, mask)
            for i, (po, pl, no_i, n) in zip(todo, spans):
                own = torch.cat([torch.arange(po, po + pl), torch.arange(S + no_i, S + no_i + n)])[-SERVE_WINDOW:]
                own = own.to(dev)
                out[i] = (K[own], V[own], h[no_i + n - 1])
        for i, seq in enumerate(seqs):
            if out[i] is None:                           # nothing new since its last step
                st = seq.draft_state["eagle"]
                out[i] = (st["k"], st["v"], st["h"])
            K, V, h_last = out[i]
            seq.draft_state["eagle"] = {"version": self.version, "head": head, "end": seq.num_cached,
                                        "k": K, "v": V, "h": h_last}
        return out

    def _grow(self, head: EagleHead, seqs, trees: list[DraftTree], spec, vocab_size: int) -> None:
        """Expand every sequence's tree level by level; all sequences' new rows of a level form
        one head call over the concatenated K/V (contexts first, then tree rows as they come).
        A node is expanded only while its path probability under the draft, prod q, stays at or
        above `spec.eagle_min_prob`: an unconfident draft stops after one level instead of paying
        for `depth` head calls whose nodes the target would reject. Which nodes get children
        depends only on their ancestors, so sampled verification stays lossless."""
        ctxs = self._contexts(head, seqs)
        embed = self.runner.embed_tokens
        dev = ctxs[0][0].device
        width = 1 if spec.shape == "chain" else spec.width
        budget = spec.depth if spec.shape == "chain" else spec.max_nodes
        K, V = torch.cat([c[0] for c in ctxs]), torch.cat([c[1] for c in ctxs])   # [S, Hkv, D]
        ctx_cols, off = [], 0                             # each sequence's context rows in K
        for c in ctxs:
            ctx_cols.append((off, c[0].shape[0]))
            off += c[0].shape[0]
        rows_of: list[dict[int, int]] = [{} for _ in seqs]   # node -> row in K/V
        frontiers = [[(-1, c[2], 0.0)] for c in ctxs]      # (node, hidden, cumulative logprob)
        q_lists: list[list] = [[] for _ in seqs]
        min_lp = math.log(spec.eagle_min_prob) if spec.eagle_min_prob > 0 else -math.inf
        for depth in range(1, spec.depth + 1):
            live = [i for i in range(len(seqs)) if frontiers[i]]
            if not live:
                break
            logits = head.logits(torch.stack([f[1] for i in live for f in frontiers[i]]))   # [F, Vd]
            new = []                                      # (sequence, node, parent hidden, score)
            at = 0
            for i in live:
                f = frontiers[i]
                cands = self._candidates(head, seqs[i], f, logits[at:at + len(f)], width, vocab_size,
                                         q_lists[i], spec.shape)
                at += len(f)
                hid = {node: h for node, h, _ in f}
                for score, parent, t, lpv, qr in cands[:max(budget - len(trees[i]), 0)]:
                    new.append((i, trees[i].add(t, parent, lpv, qr), hid[parent], score))
            # only nodes that get children need a head row: not at the last depth, not past the
            # node budget, not below the confidence cut (their subtree would rarely be accepted)
            new = [c for c in new if depth < spec.depth and len(trees[c[0]]) < budget and c[3] >= min_lp]
            if not new:
                break
            S, N = K.shape[0], len(new)
            m = torch.zeros(N, S + N, dtype=torch.bool, device=dev)
            for j, (i, node, _, _) in enumerate(new):
                o, w = ctx_cols[i]
                m[j, o:o + w] = True                       # its context rows
                m[j, S + j] = True                         # itself
                anc = trees[i].parents[node]
                while anc >= 0:                            # its ancestors
                    m[j, rows_of[i][anc]] = True
                    anc = trees[i].parents[anc]
            toks = torch.tensor([trees[i].token_ids[node] for i, node, _, _ in new], device=dev)
            npos = torch.tensor([seqs[i].num_cached + depth - 1 for i, _, _, _ in new], device=dev)
            hn, K, V = head.rows_step(embed(toks), torch.stack([g for _, _, g, _ in new]), npos, K, V, m)
            frontiers = [[] for _ in seqs]
            for j, (i, node, _, score) in enumerate(new):
                rows_of[i][node] = S + j
                frontiers[i].append((node, hn[j], score))
        for tree, q_list in zip(trees, q_lists):
            if q_list:
                tree.q_probs = torch.stack(q_list)

    @staticmethod
    def _candidates(head: EagleHead, seq, frontier, logits, width: int, vocab_size: int,
                    q_list: list, shape: str) -> list[tuple]:
        """Children of one sequence's frontier: (score, parent, target id, logprob, q row).
        Greedy: the top `width` per parent (dynamic trees: the best `width` overall). Sampling:
        `width` i.i.d. draws from the processed q of each parent, kept as they are (siblings must
        stay i.i.d. draws for the verification to be lossless)."""
        cands = []
        if seq.params.greedy:
            lp = torch.log_softmax(logits, -1)
            top = lp.topk(min(width, lp.shape[-1]), -1)
            for fi, (node, _, cum) in enumerate(frontier):
                for v, i in zip(top.values[fi].tolist(), top.indices[fi].tolist()):
                    cands.append((cum + v, node, int(head.d2t[i]), v, -1))
            if shape == "dynamic":
                cands.sort(key=lambda c: -c[0])
                cands = cands[:width]
            return cands
        full = torch.full((len(frontier), vocab_size), float("-inf"), device=logits.device)
        full[:, head.d2t] = logits
        probs = processed_probs(full, seq.params).cpu()            # exactly what we sample from
        for fi, (node, _, cum) in enumerate(frontier):
            q_list.append(probs[fi])
            for t in draw(probs[fi], seq.generator, width).tolist():
                lpv = float(torch.log(probs[fi, t]))
                cands.append((cum + lpv, node, t, lpv, len(q_list) - 1))
        return cands
