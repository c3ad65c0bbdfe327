"""Composed proposers: one tree merging several drafts' candidates (e.g. eagle+ngram),
so a learned draft never loses the cases where copying from context wins. Shared
prefixes are merged under greedy; under sampling siblings stay separate draws.

Cost-aware gate for the learned branch, re-estimated online (exponential averages):
* gain g: accepted tokens per step that only the learned branch proposed, per depth;
* cost c, in target-step units: its draft time / the target step time, plus the verify
  cost of its extra nodes (c_node per node: b / a of the step-time fit t = a + b * nodes,
  engine/costs.py, the model the adaptive tree policy uses too);
* the branch pays when g > tau_base * c (a step of tau_base tokens costing 1 + c must
  yield more than tau_base tokens per unit of time). It then drafts as deep as the depths
  whose own gain exceeds their own cost; otherwise it runs only every k-th step (shallow,
  `EXPLORE_DEPTH`) so it can earn its way back as it trains. k starts at `EXPLORE_EVERY` and
  doubles (up to `EXPLORE_MAX`) after every probe that leaves the gate closed: the same weights
  on the same traffic rarely start paying, and each probe costs a draft call and extra nodes.
  A new draft version (a swap) is probed at once and resets k: new weights are what can
  change the gain.
"""
from __future__ import annotations

import time
from dataclasses import replace

from aurora.drafts.base import ProposeContext, Proposer
from aurora.engine.costs import StepCostModel
from aurora.engine.tree import DraftTree

EXPLORE_EVERY = 8
EXPLORE_MAX = 64        # probe interval cap while the gate stays closed on one draft version
EXPLORE_DEPTH = 2
DECAY = 0.97            # exponential averaging of gains and costs (per observed step)
MAX_DEPTH = 32
PRIOR_GAIN = 0.3        # learned-only accepted tokens at depth 1 assumed before any measurement


class _Ema:
    def __init__(self, value: float = 0.0):
        self.value = value

    def add(self, x: float, decay: float = DECAY) -> None:
        self.value = decay * self.value + (1 - decay) * x


class ComposedProposer(Proposer):
    def __init__(self, parts: list[Proposer]):
        self.parts = parts
        self.name = "+".join(p.name for p in parts)
        self.learnable = any(p.learnable for p in parts)
        self.num_steps = 0
        self.gate_open = True
        self.explore_every = EXPLORE_EVERY     # probe interval while closed (backs off, see above)
        self._explore_version = None           # learned draft version the interval applies to
        self._next_probe = EXPLORE_EVERY
        self.depth_limit = 0                  # learned depth of the latest step that ran it
        self._gain_by_depth = [_Ema(PRIOR_GAIN * 0.7 ** d) for d in range(MAX_DEPTH)]  # optimistic: explore first
        self._nodes_by_depth = [_Ema() for _ in range(MAX_DEPTH)]
        self._draft_units = _Ema()            # learned draft seconds / target step seconds, per depth drafted
        self._tokens = _Ema(1.0)              # committed tokens per step (all sequences)
        self._step_cost = StepCostModel()      # target step seconds = a + b * nodes (engine/costs.py)
        self._learned_s = 0.0
        self._learned_depth = 0
        self._ran_learned = False
        self._t_verify = None
        self._num_nodes = 0
        self._learned_only: dict[int, set[int]] = {}   # id(tree) -> nodes only the learned draft proposed
        self.clock = time.perf_counter                  # injectable for tests

    @property
    def version(self) -> int:
        return max(p.version for p in self.parts)

    @property
    def learned(self):
        return next((p for p in self.parts if p.learnable), None)

    # ------------------------------------------------------------ the accounting
    @property
    def gain(self) -> float:
        """Learned-only accepted tokens per step at its current depth (while it runs)."""
        return sum(g.value for g in self._gain_by_depth[:max(1, self.depth_limit)])

    def _per_node(self) -> float:
        """Verify cost of one extra node in target steps: b / a of the step-time fit, the same
        model (and prior) the adaptive tree policy uses."""
        if not self._step_cost.ready:
            return self._step_cost.prior_node_frac
        a, b = self._step_cost.coefficients()
        return min(1.0, b / a)

    def _depth_cost(self, d: int) -> float:
        return self._draft_units.value + self._per_node() * self._nodes_by_depth[d].value

    @property
    def cost(self) -> float:
        """Its cost at its current depth, in target-step units times the tokens a step yields
        without it (the gain it must exceed)."""
        return self.tau_base * sum(self._depth_cost(d) for d in range(max(1, self.depth_limit)))

    @property
    def tau_base(self) -> float:
        return max(1.0, self._tokens.value - self.gain)

    def _choose_depth(self, spec_depth: int) -> int:
        """Deepest depth up to which every depth's own gain pays its own cost (0: none)."""
        tau = self.tau_base
        depth = 0
        for d in range(min(spec_depth, MAX_DEPTH)):
            if self._gain_by_depth[d].value > tau * self._depth_cost(d):
                depth = d + 1
            else:
                break
        return depth

    def source_stats(self) -> dict:
        return {"learned_gain": self.gain, "learned_cost": self.cost, "tau_base": self.tau_base,
                "gate_open": self.gate_open, "learned_depth": self.depth_limit,
                "explore_every": self.explore_every,
                "node_cost": self._per_node(), "draft_cost": self._draft_units.value,
                "gain_by_depth": [round(g.value, 4) for g in self._gain_by_depth[:8]]}

    # ------------------------------------------------------------ proposing
    def _probe_now(self, gate_open: bool) -> bool:
        """Open gate: probe one level deeper every `EXPLORE_EVERY` steps. Closed: probe at
        `_next_probe`, then wait twice as long; a new learned draft version is probed at once."""
        version = getattr(self.learned, "version", None)
        if version != self._explore_version:             # new weights: what can change the gain
            self._explore_version, self.explore_every = version, EXPLORE_EVERY
            self._next_probe = self.num_steps
        if gate_open:
            self.explore_every, self._next_probe = EXPLORE_EVERY, self.num_steps + EXPLORE_EVERY
            return self.num_steps % EXPLORE_EVERY == 0
        if self.num_steps < self._next_probe:
            return False
        self._next_probe = self.num_steps + self.explore_every
        self.explore_every = min(EXPLORE_MAX, 2 * self.explore_every)
        return True

    def propose(self, seqs, ctx):
        self.num_steps += 1
        depth = self._choose_depth(ctx.spec.depth)
        self.gate_open = depth > 0
        if self._probe_now(self.gate_open):              # probe one level deeper (or shallow, if closed)
            depth = min(ctx.spec.depth, depth + 1 if depth else EXPLORE_DEPTH)
        use_learned = depth > 0
        if use_learned:
            self.depth_limit = depth
        parts = [p for p in self.parts if use_learned or not p.learnable] or self.parts[:1]
        self._learned_only, self._ran_learned, self._learned_s = {}, False, 0.0
        trees = None
        for part in parts:
            pctx = ctx
            t0 = self.clock()
            if part.learnable:
                pctx = ProposeContext(replace(ctx.spec, depth=depth), ctx.vocab_size)
            extra = part.propose(seqs, pctx)
            if part.learnable:
                self._learned_s += self.clock() - t0
                self._ran_learned, self._learned_depth = True, depth
            if trees is None:
                trees, learned_base = extra, part.learnable
                continue
            for seq, tree, other in zip(seqs, trees, extra):
                budget = ctx.spec.max_nodes + ctx.spec.depth   # room for one extra chain
                n_before = len(tree)
                shared = tree.merge(other, dedupe=seq.params.greedy, max_nodes=budget)
                if learned_base:
                    self._learned_only[id(tree)] = set(range(n_before)) - shared
        self._num_nodes = sum(len(t) for t in trees)
        self._t_verify = self.clock()
        return trees

    def on_step(self, seqs, batch, result, rows):
        if self._t_verify is not None:                 # target forward + verification of this step
            step_s = self.clock() - self._t_verify
            self._step_cost.observe(self._num_nodes, step_s)
            if self._ran_learned and step_s > 0:
                self._draft_units.add(self._learned_s / max(step_s, 1e-9) / max(1, self._learned_depth))
            self._t_verify = None
        for p in self.parts:
            p.on_step(seqs, batch, result, rows)

    def observe(self, trees: list[DraftTree | None], outcomes) -> None:
        """Update gains (per depth), node counts and tokens per step from this step's outcomes."""
        tokens = sum(len(path) + 1 for tree, (path, _) in zip(trees, outcomes) if tree is not None)
        if any(t is not None for t in trees):
            self._tokens.add(tokens)
        if not self._ran_learned:
            return
        gains = [0] * MAX_DEPTH
        nodes = [0] * MAX_DEPTH
        for tree, (path, _) in zip(trees, outcomes):
            only = self._learned_only.get(id(tree)) if tree is not None else None
            if only is None:
                continue
            for n in only:
                nodes[tree.depths[n] - 1] += 1
            for n in path:
                if n in only:
                    gains[tree.depths[n] - 1] += 1
        for d in range(min(self._learned_depth, MAX_DEPTH)):
            self._gain_by_depth[d].add(gains[d])
            self._nodes_by_depth[d].add(nodes[d])

    def release(self, seq):
        for p in self.parts:
            p.release(seq)
