"""The learned draft: an EAGLE-3 head proposing trees, behind double-buffered slots.

Two preallocated heads (slots) hold the serving weights. The trainer writes the
inactive slot and calls `stage(version)`; the engine calls `flip()` between steps, so
a swap is a pointer flip, never a load, and no step sees half-written weights.
`eagle:<dir>` starts from Aurora's checkpoint or an EAGLE-3 draft (legacy or speculators).
"""
from __future__ import annotations

import copy
import logging
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

    def __init__(self, runner, head: EagleHead, version: int = 0):
        self.runner = runner
        head = head.to(device=runner.device, dtype=runner.dtype).eval().requires_grad_(False)
        self.slots = [head, copy.deepcopy(head)]
        self.active = 0
        self.version = version
        self._staged: tuple[int, int] | None = None      # (slot, version) ready to flip
        self._lock = threading.Lock()
        self.ready_event = None                          # CUDA event marking the staged slot written

    @classmethod
    def create(cls, runner, config, checkpoint: str | None = None) -> "EagleProposer":
        if checkpoint:
            from aurora.flywheel.checkpoint import load_any
            head, meta = load_any(checkpoint, runner)
            taps = tuple(meta.get("feature_layers") or runner.feature_layers)
            if taps != tuple(runner.feature_layers):
                log.info("eagle draft %s was trained on target layer outputs %s; tapping those instead of %s",
                         checkpoint, taps, runner.feature_layers)
                runner.feature_layers = taps          # features must come from the layers the draft learned on
            return cls(runner, head, version=int(meta.get("version", 0)))
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

    # ------------------------------------------------------------ proposing
    @torch.inference_mode()
    def propose(self, seqs, ctx):
        head = self.head
        return [self._propose_one(head, seq, ctx.spec, ctx.vocab_size) for seq in seqs]

    def _context(self, head: EagleHead, seq, feats, P: int):
        """Draft K/V of the context rows (positions < P), cached per sequence: only rows for
        positions cached since the last step are computed. Reset on a weight swap."""
        st = seq.draft_state.get("eagle")
        first = P - len(feats)                           # first position with a feature
        if st is None or st["version"] != self.version or st["head"] is not head \
                or not first <= st["end"] <= P or st["end"] == first:
            start = max(first, P - SERVE_WINDOW)
            K = V = None
        else:
            start, K, V = st["end"], st["k"], st["v"]
        if start < P:
            new = P - start
            rows = feats[len(feats) - new:]
            tokens = torch.tensor(seq.token_ids[start + 1:P + 1], device=feats.device)
            past = 0 if K is None else K.shape[0]
            mask = torch.ones(new, past + new, dtype=torch.bool, device=feats.device)
            mask[:, past:] = mask[:, past:].tril()
            pos = torch.arange(start, P, device=feats.device)
            h, K, V = head.rows_step(self.runner.embed_tokens(tokens), head.fc(rows.to(head.fc.weight.dtype)),
                                     pos, K, V, mask)
            K, V = K[-SERVE_WINDOW:], V[-SERVE_WINDOW:]
            h_last = h[-1]
        else:
            h_last = st["h"]
        seq.draft_state["eagle"] = {"version": self.version, "head": head, "end": P, "k": K, "v": V, "h": h_last}
        return K, V, h_last

    def _propose_one(self, head: EagleHead, seq, spec, vocab_size: int) -> DraftTree:
        tree = DraftTree(draft_version=self.version)
        feats = seq.features
        P = seq.num_cached
        if feats is None or len(feats) == 0 or len(seq.token_ids) != P + 1:
            return tree
        K, V, h_last = self._context(head, seq, feats, P)
        w = K.shape[0]
        dev = feats.device
        embed = self.runner.embed_tokens
        greedy = seq.params.greedy
        width = 1 if spec.shape == "chain" else spec.width
        budget = spec.depth if spec.shape == "chain" else spec.max_nodes
        frontier = [(-1, h_last, 0.0)]                    # (node, hidden, cumulative logprob)
        rows_of: dict[int, int] = {}                     # node -> row in K/V
        q_list = []
        for depth in range(1, spec.depth + 1):
            logits = head.logits(torch.stack([f[1] for f in frontier]))   # [F, Vd]
            cands = []                                   # (score, parent, target_id, logprob, q_row)
            if greedy:
                lp = torch.log_softmax(logits, -1)
                top = lp.topk(min(width, lp.shape[-1]), -1)
                for fi, (node, _, cum) in enumerate(frontier):
                    for v, i in zip(top.values[fi].tolist(), top.indices[fi].tolist()):
                        cands.append((cum + v, node, int(head.d2t[i]), v, -1))
            else:
                full = torch.full((len(frontier), vocab_size), float("-inf"), device=logits.device)
                full[:, head.d2t] = logits
                probs = processed_probs(full, seq.params).cpu()            # exactly what we sample from
                for fi, (node, _, cum) in enumerate(frontier):
                    q_list.append(probs[fi])
                    draws = draw(probs[fi], seq.generator, width)
                    for t in draws.tolist():
                        lpv = float(torch.log(probs[fi, t]))
                        cands.append((cum + lpv, node, t, lpv, len(q_list) - 1))
            if spec.shape == "dynamic" and greedy:      # under sampling, siblings must stay i.i.d. draws from q
                cands.sort(key=lambda c: -c[0])
                cands = cands[:width]
            room = budget - len(tree)
            cands = cands[:max(room, 0)]
            if not cands:
                break
            new_nodes = [tree.add(t, parent, lpv, qr) for _, parent, t, lpv, qr in cands]
            hid = {f[0]: f[1] for f in frontier}
            g = torch.stack([hid[c[1]] for c in cands])
            toks = torch.tensor([c[2] for c in cands], device=dev)
            npos = torch.full((len(cands),), P + depth - 1, device=dev)
            S = K.shape[0]
            m = torch.zeros(len(cands), S + len(cands), dtype=torch.bool, device=dev)
            m[:, :w] = True                              # all context rows
            for j, node in enumerate(new_nodes):
                m[j, S + j] = True
                anc = tree.parents[node]
                while anc >= 0:
                    m[j, rows_of[anc]] = True
                    anc = tree.parents[anc]
            hn, K, V = head.rows_step(embed(toks), g, npos, K, V, m)
            for j, node in enumerate(new_nodes):
                rows_of[node] = S + j
            frontier = [(node, hn[j], cands[j][0]) for j, node in enumerate(new_nodes)]
            if len(tree) >= budget:
                break
        if q_list:
            tree.q_probs = torch.stack(q_list)
        return tree
