"""The online trainer: pack trace windows, optimise a private fp32 copy of the draft head.

The target's distribution comes from the traces (kept from verification), so a step costs
the draft's forward/backward only — never the target's 49k-wide LM head. Several windows
are packed per optimizer step up to `batch_tokens` rows, in micro-batches of about
`micro_tokens` rows whose gradients accumulate: one micro-batch is one unit of work, so
serving, which takes turns with the trainer on a CPU, never waits longer than one
micro-batch for its next step. The trainer keeps a bounded
replay of recent records, makes at most `max_passes` passes over it without new traffic
(then reports nothing to do, so the flywheel sleeps), and holds back a few *recent*
records on which the guard scores drafts (simulated greedy accepted length).

Prompt distillation (`distil_prompt`): a record's prompt positions arrive with the target's
final hidden state h but no distribution; a unit of work turns up to `micro_tokens` of them
into the target's top-k of softmax(lm_head(h)) (one [rows, hidden] x [hidden, V] GEMM, the
only place training touches the target's LM head), so prompts train the draft like generated
text does. Without it those rows stay context only.
"""
from __future__ import annotations

import copy
import logging
import random
import time
from collections import deque

import torch

from aurora.config import TrainerConfig
from aurora.flywheel import losses
from aurora.flywheel.packing import Packed, pack, visibility
from aurora.flywheel.traces import top_k_probs, with_prompt_labels

log = logging.getLogger("aurora.flywheel")
EVAL_POSITIONS = 128      # last positions of each held-back record scored by the guard


def _use_autocast(mode: str, device: torch.device) -> bool:
    if mode == "off":
        return False
    if mode == "bf16" or device.type == "cuda":
        return True
    from aurora.models.loader import cpu_has_fast_bf16
    return cpu_has_fast_bf16()


class Trainer:
    def __init__(self, head, runner, config: TrainerConfig):
        self.config = config
        self.runner = runner
        self.device = runner.device
        self.vocab_size = runner.vocab_size
        self.head = copy.deepcopy(head).to(self.device, torch.float32).train().requires_grad_(True)
        self.head.d2t.requires_grad_(False)
        self.opt = self._make_opt()
        self.rng = random.Random(config.seed)
        self.replay: deque = deque(maxlen=config.replay_records)    # recent records used for training
        self.holdout: deque = deque(maxlen=config.holdout_records)  # recent records held back for guarding
        self.num_records = 0
        self._replay_rows = 0
        self.steps = 0
        self.tokens_trained = 0
        self.rows_since_new = 0        # loss rows trained since the last new record arrived
        self.skipped_nonfinite = 0
        self.train_s = 0.0
        self.last_losses: dict[str, float] = {}
        self._t2d_key, self._t2d = None, None
        self.autocast = _use_autocast(config.autocast, self.device)
        self._pending: list[list[tuple]] = []    # micro-batches (window groups) left in this optimizer step
        self._num_micro = 0                      # micro-batches in this optimizer step
        self._graph: torch.Tensor | None = None  # a micro-batch's loss between its forward and backward units
        self._undistilled: deque = deque()       # [record, rows [m] without a target, next offset]
        self.rows_distilled = 0

    def _make_opt(self):
        params = [p for p in self.head.parameters() if p.requires_grad]
        try:                                     # fused: one kernel over all tensors (24 -> 4 ms per step on CPU)
            return torch.optim.AdamW(params, lr=self.config.lr, weight_decay=self.config.weight_decay, fused=True)
        except (RuntimeError, TypeError):        # a device or torch without the fused kernel
            return torch.optim.AdamW(params, lr=self.config.lr, weight_decay=self.config.weight_decay)

    def reset_optimizer(self) -> None:
        """Fresh AdamW state; drops a half-accumulated step (its gradients may not fit anymore)."""
        self.opt = self._make_opt()
        self._pending, self._num_micro, self._graph = [], 0, None
        self.head.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ data
    def add_records(self, records) -> None:
        for rec in records:
            if int(rec.has_target.sum()) < 2:
                continue
            self.num_records += 1
            distil = self._queue_distillation(rec)
            if self.config.holdout_every and (self.num_records - 2) % self.config.holdout_every == 0:
                self.holdout.append(rec)
            else:
                if self.config.w_prompt > 0 and not distil:
                    rec = with_prompt_labels(rec)          # the prompt's positions become training rows too
                if len(self.replay) == self.replay.maxlen:
                    self._replay_rows -= int(self.replay[0].has_target.sum())
                self.replay.append(rec)
                self._replay_rows += int(rec.has_target.sum())
                self.rows_since_new = 0

    def restore_records(self, replay, holdout) -> None:
        """Replace replay and holdout with records from a saved training state (resume)."""
        self.replay.clear()
        self.holdout.clear()
        self.holdout.extend(holdout)
        self.replay.extend(replay)
        self._replay_rows = sum(int(r.has_target.sum()) for r in self.replay)
        self.rows_since_new = 0
        self._undistilled.clear()
        for rec in (*self.holdout, *self.replay):       # saved before their prompts were distilled
            self._queue_distillation(rec)

    def _queue_distillation(self, rec) -> bool:
        """Queue `rec`'s prompt rows for labelling if it carries their hidden states (dropped
        when distillation is off or they do not line up with the rows without a target)."""
        if rec.prompt_hidden is None:
            return False
        rows = (~rec.has_target).nonzero()[:, 0]
        if not self.config.distil_prompt or len(rows) != len(rec.prompt_hidden):
            rec.prompt_hidden = None
            return False
        self._undistilled.append([rec, rows, 0])
        return True

    def replay_rows(self) -> int:
        """Positions with a target in the replay (kept as a count: stats() reads it from other threads)."""
        return self._replay_rows

    @property
    def passes(self) -> float:
        """Passes over the replay since new traffic last arrived."""
        return self.rows_since_new / max(1, self.replay_rows() * self.config.unroll)

    def has_work(self) -> bool:
        return bool(self._undistilled) or (bool(self.replay) and self.passes < self.config.max_passes)

    @torch.no_grad()
    def distil_pending(self, max_rows: int | None = None) -> int:
        """Label up to `max_rows` prompt positions of the oldest undistilled record with the
        target's top-k distribution from its stored final hidden state; returns the rows done."""
        while self._undistilled:                 # a record evicted before its turn: nothing to label
            rec = self._undistilled[0][0]
            in_replay = any(r is rec for r in self.replay)
            if in_replay or any(r is rec for r in self.holdout):
                break
            rec.prompt_hidden = None
            self._undistilled.popleft()
        if not self._undistilled:
            return 0
        item = self._undistilled[0]
        rec, rows, off = item
        n = max_rows or self.config.micro_tokens
        idx, h = rows[off:off + n], rec.prompt_hidden[off:off + n]
        runner = self.runner
        ids, probs = top_k_probs(runner.logits_from_hidden(h.to(runner.device, runner.dtype)), self.config.top_k)
        k = min(ids.shape[1], rec.target_ids.shape[1])
        rec.target_ids[idx, :k], rec.target_probs[idx, :k] = ids[:, :k], probs[:, :k]
        if in_replay:
            self._replay_rows += len(idx)
        item[2] = off + len(idx)
        if item[2] >= len(rows):
            rec.prompt_hidden = None
            self._undistilled.popleft()
        self.rows_distilled += len(idx)
        return len(idx)

    def _window(self, rec) -> tuple[int, int, int]:
        """(start, end, loss rows): a span of positions with stored targets plus context before it."""
        n = len(rec.features)
        has = rec.has_target
        first = int(has.nonzero()[0, 0])
        span, ctx = self.config.span, self.config.window
        if n - first <= span:
            lo, end = first, n
        else:
            lo = self.rng.randrange(first, n - span + 1)
            end = lo + span
        return max(0, lo - ctx), end, int(has[lo:end].sum())

    def _window_rows(self, rec, start: int, end: int, n_loss: int) -> int:
        """Estimated loss rows of a window: chain rows of every unrolled level + its rejected nodes."""
        return n_loss * self.config.unroll + len(rec.rejected) * (end - start) // max(1, len(rec.features))

    def sample_windows(self) -> list[tuple]:
        return [w for group in self.sample_micro_batches() for w in group]

    def sample_micro_batches(self) -> list[list[tuple]]:
        """Windows for one optimizer step (~`batch_tokens` rows), grouped into micro-batches of
        ~`micro_tokens` rows each."""
        budget, micro = self.config.batch_tokens, self.config.micro_tokens
        groups, group, rows, group_rows, count = [], [], 0, 0, 0
        recs = list(self.replay)
        while rows < budget and count < 64:
            rec = self.rng.choice(recs)
            start, end, n_loss = self._window(rec)
            n = self._window_rows(rec, start, end, n_loss)
            if group and group_rows + n > micro:
                groups.append(group)
                group, group_rows = [], 0
            group.append((rec, start, end))
            rows, group_rows, count = rows + n, group_rows + n, count + 1
        if group:
            groups.append(group)
        return groups

    # ------------------------------------------------------------------ forward
    def _t2d_map(self, head) -> torch.Tensor:
        key = (id(head), head.d2t.data_ptr(), int(head.d2t[:16].sum()), int(head.d2t[-16:].sum()))
        if key != self._t2d_key:
            t2d = torch.full((self.vocab_size,), -1, dtype=torch.long, device=self.device)
            t2d[head.d2t.to(self.device)] = torch.arange(len(head.d2t), device=self.device)
            self._t2d_key, self._t2d = key, t2d
        return self._t2d

    def _forward(self, head, packed: Packed) -> torch.Tensor:
        """Run the head over the packed levels; returns h [R, hidden] in level order (fp32 master
        weights; matmuls in bf16 under autocast where the hardware has it)."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return self._forward_levels(head, packed).float()

    def _forward_levels(self, head, packed: Packed) -> torch.Tensor:
        dev, levels = self.device, packed.levels
        embed = self.runner.embed_tokens
        outs, K, V = [], None, None
        for L, lv in enumerate(levels):
            with torch.no_grad():
                emb = embed(torch.tensor(lv.tok, device=dev)).float()
            if L == 0:
                g = head.fc(packed.features.to(dev, torch.float32))
            else:
                g = torch.cat(outs)[torch.tensor(lv.parent, device=dev)]
            h, K, V = head.rows_step(emb, g, torch.tensor(lv.pos, device=dev), K, V, visibility(levels, L, dev))
            outs.append(h)
        return torch.cat(outs)

    def _loss(self, head, packed: Packed, with_grad_terms: bool = True):
        cfg, dev, levels = self.config, self.device, packed.levels
        h = self._forward(head, packed)
        target = torch.tensor([t for lv in levels for t in lv.target], device=dev)
        has = target >= 0
        chain = torch.tensor([c for lv in levels for c in lv.chain], device=dev)
        lvl = torch.tensor([i for i, lv in enumerate(levels) for _ in lv.pos], device=dev)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            logits = head.logits(h[has]).float()                      # [N, Vd] rows with a target only
        logq = torch.log_softmax(logits, -1)
        t2d = self._t2d_map(head)
        p_all = losses.dense_targets(packed.target_ids.to(dev), packed.target_probs.to(dev), t2d, len(head.d2t))
        tgt = target[has]
        p = p_all[tgt]                                                # [N, Vd]
        ce = losses.cross_entropy(p, logq)
        ch, lv_has = chain[has], lvl[has]
        decay = cfg.unroll_decay ** lv_has.float()
        if cfg.w_prompt > 0:                                          # prompt rows: hard labels, weighted
            decay = torch.where(packed.target_hard.to(dev)[tgt], cfg.w_prompt * decay, decay)
        terms, total = {}, torch.zeros((), device=dev)
        if with_grad_terms:
            if cfg.w_imitation > 0 and ch.any():
                terms["imitation"] = (ce * decay)[ch].sum() / decay[ch].sum()
                total = total + cfg.w_imitation * terms["imitation"]
            tree = ~ch
            if tree.any() and (cfg.w_discard > 0 or cfg.w_counterfactual > 0):
                terms["counterfactual"] = ce[tree].mean()
                total = total + cfg.w_counterfactual * terms["counterfactual"]
                row_in_has = torch.cumsum(has.long(), 0) - 1           # global row -> row of `logq`
                parents = torch.tensor([pa for lv in levels for pa in lv.parent], device=dev)[has][tree]
                toks = torch.tensor([t for lv in levels for t in lv.discard_tok], device=dev)[has][tree]
                dtok = t2d[toks]
                ok = (dtok >= 0) & (target[parents] >= 0)
                if ok.any():
                    pr = row_in_has[parents[ok]]
                    args = (logq[pr], p_all[target[parents[ok]]], dtok[ok])
                    if cfg.discard == "hinge":
                        terms["discard"] = losses.hinge(args[0].exp(), args[1], args[2]).mean()
                    else:
                        terms["discard"] = losses.discard(*args).mean()
                    total = total + cfg.w_discard * terms["discard"]
            if cfg.w_accept_len > 0:
                alpha = losses.acceptance(p, logq.exp())
                terms["accept_len"] = -self._chain_tau(packed, alpha, has).mean()
                total = total + cfg.w_accept_len * terms["accept_len"]
        with torch.no_grad():
            match = head.d2t[logits.argmax(-1)] == packed.target_ids.to(dev)[tgt, 0]
            sim_tau = self._chain_tau(packed, match.float(), has)
        return total, terms, int(has.sum()), sim_tau

    @staticmethod
    def _chain_tau(packed: Packed, alpha: torch.Tensor, has: torch.Tensor) -> torch.Tensor:
        """Per level-1 row with a target: 1 + sum_k prod_{j<=k} alpha(level j, pos + j - 1).
        alpha: [N] values of the rows with a target (`has`)."""
        index, row = {}, 0
        has_l = has.tolist()
        k = 0
        for L, lv in enumerate(packed.levels):
            for s, pos, c in zip(lv.seg, lv.pos, lv.chain):
                if has_l[row]:
                    if c:
                        index[(s, L, pos)] = k
                    k += 1
                row += 1
        taus = []
        for s, pos in zip(packed.levels[0].seg, packed.levels[0].pos):
            if (s, 0, pos) not in index:
                continue
            run, tau = 1.0, 1.0
            for L in range(len(packed.levels)):
                r = index.get((s, L, pos + L))
                if r is None:
                    break
                run = run * alpha[r]
                tau = tau + run
            taus.append(tau if torch.is_tensor(tau) else alpha.new_tensor(tau))
        return torch.stack(taus) if taus else alpha.new_ones(1)

    # ------------------------------------------------------------------ one unit of work
    def train_step(self) -> bool:
        """One unit of work: a prompt-distillation unit, or half a micro-batch. A micro-batch is
        two units, forward (loss, graph kept) then backward (gradients accumulated), so a request
        that arrives mid-unit waits for about half as long (serving takes its turns in between).
        The optimizer steps (`steps` += 1) after the last micro-batch's backward. False: nothing
        to train on."""
        if self._graph is None and not self._pending and not self.has_work():
            return False
        t0 = time.perf_counter()
        try:
            if self._graph is not None:          # second half of a micro-batch
                loss, self._graph = self._graph, None
                (loss / self._num_micro).backward()
                if not self._pending:
                    self._optimizer_step()
                return True
            if self._undistilled:                # labelling prompt rows is a unit of work of its own
                self.distil_pending()
                return True
            if not self._pending:
                self._pending = self.sample_micro_batches()
                self._num_micro = len(self._pending)
                self.opt.zero_grad(set_to_none=True)
            packed = pack(self._pending.pop(0), self.config.unroll)
            loss, terms, rows, _ = self._loss(self.head, packed)
            if torch.isfinite(loss):
                self._graph = loss
                self.tokens_trained += rows
                self.rows_since_new += rows
                self.last_losses = {k: v.item() for k, v in terms.items()} | {"total": loss.item()}
            else:
                self.skipped_nonfinite += 1
                if not self._pending:
                    self._optimizer_step()
            return True
        finally:
            self.train_s += time.perf_counter() - t0

    @property
    def mid_micro_batch(self) -> bool:
        """A forward's graph waits for its backward: the weights must not change in between."""
        return self._graph is not None

    def _optimizer_step(self) -> None:
        if any(p.grad is not None for p in self.head.parameters()):
            # the total norm is non-finite iff some gradient is: one pass checks and clips
            norm = torch.nn.utils.clip_grad_norm_(self.head.parameters(), self.config.grad_clip)
            if torch.isfinite(norm):
                self.opt.step()
                self.steps += 1
            else:
                self.skipped_nonfinite += 1
        self.opt.zero_grad(set_to_none=True)

    def optimizer_step(self) -> bool:
        """Run micro-batches until one optimizer step completes (offline A/Bs, tests)."""
        start = self.steps
        while self.steps == start:
            if not self.train_step():
                return False
        return True

    def eval_windows(self, records=None) -> list[tuple]:
        records = list(self.holdout) if records is None else records
        out = []
        for rec in records:
            n = len(rec.features)
            first = int(rec.has_target.nonzero()[0, 0])
            lo = max(first, n - EVAL_POSITIONS)
            out.append((rec, max(0, lo - self.config.window), n))
        return out

    @torch.no_grad()
    def evaluate(self, head, windows: list[tuple] | None = None) -> float:
        """Simulated greedy chain accepted length of `head` on held-back traces (one packed pass)."""
        windows = self.eval_windows() if windows is None else windows
        if not windows:
            return float("nan")
        _, _, _, tau = self._loss(head, pack(windows, self.config.unroll), with_grad_terms=False)
        return float(tau.mean())
