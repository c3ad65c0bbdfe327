"""The online trainer: drain traces, pack trees, optimise a private fp32 copy of the head.

Runs in a background thread (with its own torch thread budget on CPU, on a second
CUDA stream on GPU). It never touches the serving slot: publishing goes through
`weights.publish`, which writes the inactive slot and lets the engine flip.
"""
from __future__ import annotations

import copy
import logging
import random

import torch

from aurora.config import TrainerConfig
from aurora.flywheel import losses
from aurora.flywheel.packing import pack, visibility

log = logging.getLogger("aurora.flywheel")


class Trainer:
    def __init__(self, head, runner, config: TrainerConfig):
        self.config = config
        self.runner = runner
        self.device = runner.device
        self.head = copy.deepcopy(head).to(self.device, torch.float32).train().requires_grad_(True)
        self.head.d2t.requires_grad_(False)
        self.opt = self._make_opt()
        self.rng = random.Random(config.seed)
        self.replay: list = []                    # recent records used for training
        self.holdout: list = []                   # recent records held back for guarding
        self.steps = 0
        self.tokens_trained = 0
        self.skipped_nonfinite = 0
        self.last_losses: dict[str, float] = {}

    def _make_opt(self):
        params = [p for p in self.head.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.config.lr, weight_decay=self.config.weight_decay)

    def add_records(self, records) -> None:
        for rec in records:
            if len(rec.features) < 3:
                continue
            if len(self.holdout) < 4 or self.rng.random() < 0.1:
                self.holdout.append(rec)
                self.holdout = self.holdout[-8:]
            else:
                self.replay.append(rec)
        self.replay = self.replay[-256:]

    # ------------------------------------------------------------------ forward
    def _target_probs(self, hidden: torch.Tensor, d2t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, h] stored target hidden -> (p on draft ids [N, Vd], target argmax [N])."""
        with torch.no_grad():
            logits = self.runner.logits_from_hidden(hidden.to(self.device, self.runner.dtype))
            p = torch.softmax(logits, -1)
            return p[:, d2t].float(), logits.argmax(-1)

    def _forward(self, head, record, start: int, end: int):
        cfg = self.config
        levels, feats, tgt_hidden = pack(record, start, end, cfg.unroll, max_tree_depth=cfg.unroll)
        dev = self.device
        p, tgt_argmax = self._target_probs(tgt_hidden, head.d2t)
        embed = self.runner.embed_tokens
        outs, K, V = [], None, None
        for L, lv in enumerate(levels):
            toks = torch.tensor(lv.tok, device=dev)
            with torch.no_grad():
                emb = embed(toks).float()
            if L == 0:
                g = head.fc(feats.to(dev, torch.float32))
            else:
                allh = torch.cat(outs)
                g = allh[torch.tensor(lv.parent, device=dev)]
            mask = visibility(levels, L, dev)
            h, K, V = head.rows_step(emb, g, torch.tensor(lv.pos, device=dev), K, V, mask)
            outs.append(h)
        return levels, torch.cat(outs), p, tgt_argmax

    def _loss(self, head, record, start, end):
        cfg = self.config
        levels, h, p, tgt_argmax = self._forward(head, record, start, end)
        logits = head.logits(h)                                        # [R, Vd]
        logq = torch.log_softmax(logits, -1)
        tgt = torch.tensor([t for lv in levels for t in lv.target], device=self.device)
        chain = torch.tensor([c for lv in levels for c in lv.chain], device=self.device)
        lvl = torch.tensor([i for i, lv in enumerate(levels) for _ in lv.pos], device=self.device)
        pr = p[tgt]
        ce = losses.cross_entropy(pr, logq)                            # [R]
        decay = cfg.unroll_decay ** lvl.float()
        terms = {}
        total = torch.zeros((), device=self.device)
        if cfg.w_imitation > 0:
            terms["imitation"] = (ce * decay)[chain].sum() / decay[chain].sum()
            total = total + cfg.w_imitation * terms["imitation"]
        if cfg.w_discard > 0 and (~chain).any():
            parents = torch.tensor([pa for lv in levels for pa in lv.parent], device=self.device)[~chain]
            tok_t = torch.tensor([t for lv in levels for t in lv.discard_tok], device=self.device)[~chain]
            t2d = torch.full((self.runner.vocab_size,), -1, dtype=torch.long, device=self.device)
            t2d[head.d2t] = torch.arange(len(head.d2t), device=self.device)
            dtok = t2d[tok_t]
            ok = dtok >= 0
            q_par = logq[parents].exp()
            excess = losses.discard_excess(q_par[ok], p[tgt[parents]][ok], dtok[ok]) if ok.any() else ce.new_zeros(1)
            terms["discard"] = excess.mean() + ce[~chain].mean()
            total = total + cfg.w_discard * terms["discard"]
        if cfg.w_accept_len > 0:
            alpha = losses.acceptance(pr, logq.exp())
            terms["accept_len"] = -self._chain_tau(levels, alpha, chain).mean()
            total = total + cfg.w_accept_len * terms["accept_len"]
        with torch.no_grad():
            match = (head.d2t[logits.argmax(-1)] == tgt_argmax[tgt])
            sim_tau = self._chain_tau(levels, match.float(), chain)
        return total, terms, int(h.shape[0]), float(sim_tau.mean())

    @staticmethod
    def _chain_tau(levels, alpha: torch.Tensor, chain: torch.Tensor) -> torch.Tensor:
        """Per root position r: 1 + sum_k prod_{j<=k} alpha(level j, pos r + j - 1)."""
        index, off = {}, 0
        for L, lv in enumerate(levels):
            for k, (pos, c) in enumerate(zip(lv.pos, lv.chain)):
                if c:
                    index[(L, pos)] = off + k
            off += len(lv.pos)
        taus = []
        for pos in levels[0].pos:
            run, tau = 1.0, 1.0
            for L in range(len(levels)):
                row = index.get((L, pos + L))
                if row is None:
                    break
                run = run * alpha[row]
                tau = tau + run
            taus.append(tau if torch.is_tensor(tau) else alpha.new_tensor(tau))
        return torch.stack(taus)

    def _window(self, record) -> tuple[int, int]:
        n = len(record.features) - 1
        span = max(8, self.config.batch_tokens // max(1, self.config.unroll + 1))
        if n <= span:
            return 0, n
        start = self.rng.randrange(0, n - span + 1)
        return start, start + span

    # ------------------------------------------------------------------ one step
    def train_step(self) -> bool:
        if not self.replay:
            return False
        recent = self.replay[-64:]
        record = self.rng.choice(recent)
        start, end = self._window(record)
        loss, terms, rows, _ = self._loss(self.head, record, start, end)
        if not torch.isfinite(loss):
            self.skipped_nonfinite += 1
            self.opt.zero_grad(set_to_none=True)
            return False
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.head.parameters(), self.config.grad_clip)
        self.opt.step()
        self.steps += 1
        self.tokens_trained += rows
        self.last_losses = {k: v.item() for k, v in terms.items()} | {"total": loss.item()}
        return True

    @torch.no_grad()
    def evaluate(self, head) -> float:
        """Simulated greedy chain accepted length of `head` on held-back traces."""
        if not self.holdout:
            return float("nan")
        taus = []
        for rec in self.holdout:
            n = len(rec.features) - 1
            _, _, _, tau = self._loss(head, rec, max(0, n - 128), n)
            taus.append(tau)
        return sum(taus) / len(taus)

    def weights_finite(self) -> bool:
        return all(torch.isfinite(p).all() for p in self.head.parameters())
