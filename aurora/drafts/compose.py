"""Composed proposers: one tree merging several drafts' candidates (e.g. eagle+ngram),
so a learned draft never loses the cases where copying from context wins. Shared
prefixes are merged under greedy; under sampling siblings stay separate draws.

The training-free drafts propose first; the learned draft's candidates are grafted onto
their trees, and the nodes only it proposed are marked (`DraftTree.learned`, kept through
the adaptive policy's pruning). Its accounting is kept per *coverage group*, by how much
context the other drafts matched for this step's proposal (`DraftTree.match_len`): none
(no proposal), 1, 2, or >= 3 tokens. A longer match is more often right, and where the
lookup is right the learned draft only repeats it: its marginal gain falls with the match
length, and the groups let the gate skip it where it does not pay while it keeps drafting
where nothing else does.

Cost-aware gate per group, re-estimated online (exponential averages):
* gain g: accepted tokens per step that only the learned branch proposed, per depth;
* cost c, in target-step units: its draft time / the target step time, plus the verify
  cost of its extra nodes (c_node per node: b / a of the step-time fit t = a + b * nodes,
  engine/costs.py, the model the adaptive tree policy uses too);
* the branch pays when g > tau_base * c (a step of tau_base tokens costing 1 + c must
  yield more than tau_base tokens per unit of time). It then drafts as deep as the depths
  whose own gain exceeds their own cost; otherwise it runs only every k-th step of the
  group (shallow, `EXPLORE_DEPTH`) so it can earn its way back as it trains. k starts at
  `EXPLORE_EVERY` and doubles (up to `EXPLORE_MAX`) after every probe that leaves the gate
  closed: the same weights on the same traffic rarely start paying, and each probe costs a
  draft call and extra nodes. A new draft version (a swap) is probed at once and resets k:
  new weights are what can change the gain.
The learned draft runs once per step, for the sequences whose group's gate is open (or
probing), as deep as the deepest such group; each tree keeps only its group's depth.
`SpecConfig(learned_gate="single")` keeps one gate for all steps (the accounting before the
groups, for A/Bs).
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
GROUP_NAMES = ("none", "match1", "match2", "match3+")   # by the other drafts' matched context length
UNCOVERED = 0


def coverage_group(tree: DraftTree) -> int:
    """0: no other proposal; else the matched context length, capped at 3 (at least 1)."""
    return 0 if not len(tree) else min(len(GROUP_NAMES) - 1, max(1, tree.match_len))


class _Ema:
    def __init__(self, value: float = 0.0):
        self.value = value

    def add(self, x: float, decay: float = DECAY) -> None:
        self.value = decay * self.value + (1 - decay) * x


class _Branch:
    """The learned branch's measurements and probe schedule in one coverage group; its
    steps are the steps in which the group had a sequence."""

    def __init__(self):
        self.gain_by_depth = [_Ema(PRIOR_GAIN * 0.7 ** d) for d in range(MAX_DEPTH)]  # optimistic: explore first
        self.nodes_by_depth = [_Ema() for _ in range(MAX_DEPTH)]
        self.tokens = _Ema(1.0)              # committed tokens per step (all sequences of the step)
        self.share = _Ema()                  # fraction of steps with a sequence in this group
        self.steps = 0
        self.gate_open = True
        self.depth_limit = 0                 # learned depth of the latest step it ran
        self.explore_every = EXPLORE_EVERY   # probe interval while closed (backs off, see above)
        self.explore_version = None          # learned draft version the interval applies to
        self.next_probe = EXPLORE_EVERY

    def gain(self) -> float:
        """Learned-only accepted tokens per step at its current depth (while it runs)."""
        return sum(g.value for g in self.gain_by_depth[:max(1, self.depth_limit)])

    def tau_base(self) -> float:
        return max(1.0, self.tokens.value - self.gain())

    def choose_depth(self, spec_depth: int, depth_cost) -> int:
        """Deepest depth up to which every depth's own gain pays its own cost (0: none)."""
        tau = self.tau_base()
        depth = 0
        for d in range(min(spec_depth, MAX_DEPTH)):
            if self.gain_by_depth[d].value > tau * depth_cost(self, d):
                depth = d + 1
            else:
                break
        return depth

    def probe_now(self, version) -> bool:
        """Open gate: probe one level deeper every `EXPLORE_EVERY` steps. Closed: probe at
        `next_probe`, then wait twice as long; a new learned draft version is probed at once."""
        if version != self.explore_version:             # new weights: what can change the gain
            self.explore_version, self.explore_every = version, EXPLORE_EVERY
            self.next_probe = self.steps
        if self.gate_open:
            self.explore_every, self.next_probe = EXPLORE_EVERY, self.steps + EXPLORE_EVERY
            return self.steps % EXPLORE_EVERY == 0
        if self.steps < self.next_probe:
            return False
        self.next_probe = self.steps + self.explore_every
        self.explore_every = min(EXPLORE_MAX, 2 * self.explore_every)
        return True


class ComposedProposer(Proposer):
    def __init__(self, parts: list[Proposer]):
        self.parts = parts
        self.name = "+".join(p.name for p in parts)
        self.learnable = any(p.learnable for p in parts)
        self.num_steps = 0
        self._branches = [_Branch() for _ in GROUP_NAMES]   # by coverage group
        self._draft_units = _Ema()            # learned draft seconds / target step seconds, per depth drafted
        self._step_cost = StepCostModel()      # target step seconds = a + b * nodes (engine/costs.py)
        self._learned_s = 0.0
        self._learned_depth = 0
        self._ran_learned = False
        self._depths: dict[int, int] = {}     # group -> learned depth this step (0: not run)
        self._t_verify = None
        self._num_nodes = 0
        self.clock = time.perf_counter                  # injectable for tests

    @property
    def version(self) -> int:
        return max(p.version for p in self.parts)

    @property
    def learned(self):
        return next((p for p in self.parts if p.learnable), None)

    # ------------------------------------------------------------ the accounting
    def _per_node(self) -> float:
        """Verify cost of one extra node in target steps: b / a of the step-time fit, the same
        model (and prior) the adaptive tree policy uses."""
        if not self._step_cost.ready:
            return self._step_cost.prior_node_frac
        a, b = self._step_cost.coefficients()
        return min(1.0, b / a)

    def _depth_cost(self, branch: _Branch, d: int) -> float:
        return self._draft_units.value + self._per_node() * branch.nodes_by_depth[d].value

    def _cost(self, branch: _Branch) -> float:
        """Its cost at its current depth, in target-step units times the tokens a step yields
        without it (the gain it must exceed)."""
        return branch.tau_base() * sum(self._depth_cost(branch, d) for d in range(max(1, branch.depth_limit)))

    def _weights(self) -> list[float]:
        total = sum(b.share.value for b in self._branches)
        return [b.share.value / total if total else 1.0 / len(self._branches) for b in self._branches]

    @property
    def gain(self) -> float:
        """Learned-only accepted tokens per step at the current depths, averaged over the
        groups by how often each occurs."""
        return sum(w * b.gain() for w, b in zip(self._weights(), self._branches))

    @property
    def cost(self) -> float:
        return sum(w * self._cost(b) for w, b in zip(self._weights(), self._branches))

    @property
    def gate_open(self) -> bool:
        return any(b.gate_open and b.share.value > 0 for b in self._branches)

    def _main(self) -> _Branch:
        """The group most steps have (its probe interval and depth are the ones reported)."""
        return max(self._branches, key=lambda b: b.share.value)

    @property
    def explore_every(self) -> int:
        return self._main().explore_every

    def source_stats(self) -> dict:
        main = self._main()
        groups = {}
        for name, b in zip(GROUP_NAMES, self._branches):
            groups[name] = {"share": round(b.share.value, 4), "gain": b.gain(), "cost": self._cost(b),
                            "gate_open": b.gate_open, "depth": b.depth_limit,
                            "gain_by_depth": [round(g.value, 4) for g in b.gain_by_depth[:8]]}
        return {"learned_gain": self.gain, "learned_cost": self.cost, "tau_base": main.tau_base(),
                "gate_open": self.gate_open, "learned_depth": main.depth_limit,
                "explore_every": main.explore_every,
                "node_cost": self._per_node(), "draft_cost": self._draft_units.value,
                "gain_by_depth": [round(g.value, 4) for g in main.gain_by_depth[:8]], "by_coverage": groups}

    # ------------------------------------------------------------ proposing
    def propose(self, seqs, ctx):
        self.num_steps += 1
        spec = ctx.spec
        budget = spec.max_nodes + spec.depth                 # room for one extra chain
        trees = None
        for part in self.parts:                              # the training-free drafts first
            if part.learnable:
                continue
            extra = part.propose(seqs, ctx)
            if trees is None:
                trees = extra
                continue
            for seq, tree, other in zip(seqs, trees, extra):
                tree.merge(other, dedupe=seq.params.greedy, max_nodes=budget)
        trees = trees or [DraftTree() for _ in seqs]
        learned = self.learned
        self._depths, self._ran_learned, self._learned_s = {}, False, 0.0
        if learned is not None:
            self._propose_learned(learned, seqs, trees, spec, ctx.vocab_size, budget)
        self._num_nodes = sum(len(t) for t in trees)
        self._t_verify = self.clock()
        return trees

    def _propose_learned(self, learned, seqs, trees: list[DraftTree], spec, vocab_size: int, budget: int) -> None:
        """Each group's gate decides its depth (0: skip); the learned draft runs once for the
        sequences of the open (or probing) groups and is grafted onto their trees."""
        single = spec.learned_gate == "single"             # one gate for every step (an A/B of the groups)
        groups = [UNCOVERED if single else coverage_group(t) for t in trees]
        version = learned.version
        for g, branch in enumerate(self._branches):
            branch.share.add(float(g in groups))
            if g not in groups:
                continue
            branch.steps += 1
            depth = branch.choose_depth(spec.depth, self._depth_cost)
            branch.gate_open = depth > 0
            if branch.probe_now(version):              # probe one level deeper (or shallow, if closed)
                depth = min(spec.depth, depth + 1 if depth else EXPLORE_DEPTH)
            if depth:
                branch.depth_limit = depth
            self._depths[g] = depth
        run = [i for i, g in enumerate(groups) if self._depths[g] > 0]
        if not run:
            return
        depth = max(self._depths[groups[i]] for i in run)
        t0 = self.clock()
        extra = learned.propose([seqs[i] for i in run], ProposeContext(replace(spec, depth=depth), vocab_size))
        self._learned_s, self._learned_depth, self._ran_learned = self.clock() - t0, depth, True
        for i, other in zip(run, extra):
            tree, n_before = trees[i], len(trees[i])
            tree.merge(other, dedupe=seqs[i].params.greedy, max_nodes=max(budget, n_before + depth),
                       max_depth=self._depths[groups[i]])
            tree.learned, tree.coverage = set(range(n_before, len(tree))), groups[i]
            tree.draft_version = other.draft_version

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
        """Update each group's gains (per depth), node counts and tokens per step from this
        step's outcomes."""
        if any(t is not None for t in trees):
            tokens = sum(len(path) + 1 for tree, (path, _) in zip(trees, outcomes) if tree is not None)
            for g in self._depths:
                self._branches[g].tokens.add(tokens)
        if not self._ran_learned:
            return
        gains = [[0] * MAX_DEPTH for _ in self._branches]
        nodes = [[0] * MAX_DEPTH for _ in self._branches]
        for tree, (path, _) in zip(trees, outcomes):
            if tree is None or tree.coverage < 0:
                continue
            for n in tree.learned:
                nodes[tree.coverage][tree.depths[n] - 1] += 1
            for n in path:
                if n in tree.learned:
                    gains[tree.coverage][tree.depths[n] - 1] += 1
        for g, depth in self._depths.items():
            branch = self._branches[g]
            for d in range(min(depth, MAX_DEPTH)):
                branch.gain_by_depth[d].add(gains[g][d])
                branch.nodes_by_depth[d].add(nodes[g][d])

    def release(self, seq):
        for p in self.parts:
            p.release(seq)
