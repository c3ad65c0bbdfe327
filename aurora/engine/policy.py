"""Speculation policy: how many draft nodes each sequence verifies this step, or none.

The fixed policy proposes the configured `SpecConfig` and verifies every node. The
adaptive one (`SpecConfig.adaptive`) estimates, per node, the probability it is accepted,
p(node) = prod over its path of alpha(kind, source, depth) (conditional acceptance measured
online, blended with the sequence's own history), and verifies the set of nodes that
maximises batch tokens per second, (B + sum of p over verified nodes) / t(B + N): candidates
taken best first (highest p, whole root paths), every prefix scored, the best kept. t(T) is
the step time of T rows as the engine measured it at this batch size (`costs.py`; one model per
batch-size bucket once it has evidence): on a CPU it is flat for a few rows and then rises by
row blocks, so the first node whose own gain p falls below its own cost is not where the best
prefix ends (a line t = a + b*T, `policy_costs="linear"`, makes
every node pay b and prunes the nearly free first nodes). Before proposing, the realised gain
per proposing sequence (accepted tokens, including steps where the draft had nothing) is weighed against
the draft's measured time plus the verified nodes' cost; when it does not pay, the step
skips proposing (speculation off), re-probing now and then.

The cost model sees only the target forward. What a step costs besides it (proposing, tree
bookkeeping, verification, sampling) is caught end to end: the engine reports every decode
step's wall time and emitted tokens, kept per (batch-size bucket, decoding mode, speculating or
not) as decayed sums, and once both kinds of step have evidence in a bucket, a measured
tokens/s without speculation above the one with it switches speculation off there (with
probes); steps without speculation are sampled now and then so that evidence exists. Both kinds
of a bucket forget at the same pace (per step of the bucket), so they describe the same recent
stretch of time, and a kind without recent evidence has none.

Acceptance is kept at two levels. Coarse: (kind, depth), kind = lookup / scored (node_kind).
Fine: (kind/source, depth), the source saying what proposed the node on what evidence
(`DraftTree.sources`: e.g. a suffix match of 2 tokens seen once, "sfx:m2:s1", against one of
12 tokens seen 4+ times, "sfx:m12:s4"). A fine estimate starts from the coarse one as its
prior (W pseudo-observations), so a new source costs nothing until its own evidence says
otherwise:
    alpha_coarse = (wins + PRIOR_ALPHA W) / (tries + W),
    alpha_fine   = (wins_f + alpha_coarse W) / (tries_f + W).
A sequence's own history shifts it in log-odds: logit alpha = logit alpha_fine + delta, one
delta per (sequence, draft family: suffix / prompt lookup / agreement / learned), fitted online
by a gradient step on the log-loss of every judged node, delta += LR (accepted - alpha). A
request that repeats earlier text (every node accepted) lifts all its depths within a step or
two, where per-depth own counts would need many steps each (a 96-token request at tau 12 has
eight); a request of new text lowers them as fast.
A third level marks the sequence's state: ':run' when its previous step accepted at least
RUN_LONG tokens, or at least RUN_LEAF and everything on its verified path up to a leaf
("lookup/sfx:m16:s1:run"): a request copying earlier text keeps copying, and deep nodes are
accepted far more often there than on average (the leaf rule: a pruned tree caps what a step
can accept, so a run must not need more than the policy let it show).
Pooled, the one-occurrence short matches of new text (rarely right) and the long repeated
matches (nearly always right) average into one alpha that verifies the former too deep and
the latter too shallow.
"""
from __future__ import annotations

import math
import random

from aurora.config import SpecConfig
from aurora.engine.costs import StepCostModel
from aurora.engine.tree import DraftTree

PRIOR_ALPHA = 0.6          # conditional acceptance before any evidence (optimistic: explore)
PRIOR_WEIGHT = 4.0         # pseudo-observations behind the prior / the global estimate
PROBE_EVERY = 8            # when off, propose anyway one step in this many
RATE_DECAY = 0.99          # forgetting of the measured step rates (per decode step of the bucket, both kinds)
RATE_MIN_STEPS = 4.0       # decayed steps of each kind before measured rates overrule the model
EXPLORE_OFF_EVERY = 16     # without enough evidence of steps without speculation, one in this many
OWN_LR = 1.0               # step of a sequence's log-odds shift per judged node
OWN_MAX = 6.0              # |shift| cap
RUN_LONG = 8               # a previous step that accepted this many tokens marks a copying run,
RUN_LEAF = 4               # ... or this many, ending at a leaf (it accepted all it was shown)
BATCH_COST_MIN_OBS = 8     # decode steps of a batch-size bucket before its own step-cost curve is read


def node_kind(tree: DraftTree, node: int, greedy: bool = True) -> str:
    """'scored': drawn or ranked by a learned draft (has a q row or a draft logprob);
    'lookup': copied deterministically (prompt lookup, suffix memory). Under sampling a node
    is accepted with probability min(1, p/q), not when it equals the argmax, so sampled
    sequences keep their own statistics (kind + ':sampled')."""
    kind = "scored" if tree.q_rows[node] >= 0 or tree.logprobs[node] != 0.0 else "lookup"
    return kind if greedy else kind + ":sampled"


def node_key(tree: DraftTree, node: int, greedy: bool = True) -> tuple[str, str]:
    """(coarse kind, fine kind) of a node's acceptance statistics; fine == coarse when the
    tree knows nothing of the node's source."""
    kind = node_kind(tree, node, greedy)
    source = tree.sources[node]
    return kind, (f"{kind}/{source}" if source else kind)


def _family(kind: str, fine: str) -> str:
    """The draft family of a fine kind, across kinds: 'sfx' of 'lookup/sfx:m8:s1' and of
    'scored/sfx:m2:s4:minor' (a suffix node is 'scored' where its path branched), 'sfx:sampled'
    under sampling; the kind itself when the node has no source."""
    if fine == kind or "/" not in fine:
        return kind
    source = fine.split("/", 1)[1].split(":", 1)[0]
    return source + (":sampled" if kind.endswith(":sampled") else "")


def _chain(kind: str, fine: str) -> list[str]:
    """Keys from coarse to fine, each estimate the prior of the next: 'lookup',
    'lookup/sfx:m8:s1', 'lookup/sfx:m8:s1:run'."""
    keys = [kind]
    if fine != kind:
        base = fine.removesuffix(":run")
        keys += [base, fine] if base != fine else [base]
    return keys


def _logit(p: float) -> float:
    p = min(max(p, 1e-4), 1 - 1e-4)
    return math.log(p / (1 - p))


def _everyone(greedy: bool) -> tuple:
    """Key of the all-sequences realised gain of one decoding mode (request ids are strings)."""
    return ("*", greedy)


class SpeculationPolicy:
    reads_step_rates = False     # whether `observe_wall` is used (the engine skips timing it if not)

    def __init__(self, spec: SpecConfig):
        self.spec = spec

    @property
    def budget(self) -> int:
        """Upper bound on tree nodes per sequence (KV blocks are reserved for it)."""
        return self.spec.max_nodes + self.spec.depth + 1

    def choose(self, seqs) -> SpecConfig | None:
        """Tree shape for this step; None disables speculation for the step."""
        return self.spec

    def prune(self, seqs, trees: list[DraftTree], base_tokens: int = 0) -> list[DraftTree]:
        """The nodes to verify of each proposed tree (all of them for the fixed policy).
        `base_tokens`: rows the step runs besides tree nodes."""
        return trees

    def observe_step(self, num_tokens: int, forward_s: float, num_proposed: int, draft_s: float,
                     num_seqs: int | None = None) -> None:
        """Timing of one decode step (target forward over `num_tokens` rows of `num_seqs` sequences;
        draft time)."""

    def observe(self, seqs, trees, outcomes) -> None:
        """Accepted paths of the verified trees."""

    def observe_wall(self, seqs, speculated: bool, tokens: int, seconds: float) -> None:
        """A whole decode step (proposing to committing): `tokens` emitted in `seconds`."""

    def release(self, seq) -> None:
        """Forget a finished sequence."""

    def state(self) -> dict:
        return {}


class AdaptivePolicy(SpeculationPolicy):
    reads_step_rates = True

    def __init__(self, spec: SpecConfig, seed: int = 0):
        super().__init__(spec)
        self.costs = StepCostModel()                      # every decode step (and the draft's cost)
        self._batch_costs: dict[str, StepCostModel] = {}   # batch-size bucket -> its own steps only
        self._tries: dict[tuple[str, int], float] = {}     # (kind, depth) -> attempts (parent accepted)
        self._wins: dict[tuple[str, int], float] = {}      # ... -> accepted
        self._seq: dict[str, dict[str, float]] = {}       # request id -> draft family -> log-odds shift
        self._run: dict[str, bool] = {}                    # request id -> its previous step was a copying run
        self._rng = random.Random(seed)
        self._off_steps = 0
        self._gain: dict[str | None, list[float]] = {}      # request id (None: all) -> [w, accepted, nodes]
        self.num_steps_off = 0
        self.num_nodes_proposed = 0
        self.num_nodes_verified = 0
        self._rates: dict[tuple, list[float]] = {}          # (bucket, mode, speculated) -> [w, tokens, s]
        self._explore = 0
        self.num_steps_off_measured = 0                     # off because measured rates said so

    # ------------------------------------------------------------ estimates
    def _key(self, tree: DraftTree, node: int, greedy: bool, request_id: str | None = None) -> tuple[str, str]:
        """node_key, the fine kind marked ':run' when the sequence's previous step accepted at least
        RUN_LONG tokens, or RUN_LEAF and its whole verified path (a request copying earlier text
        keeps copying; a pruned tree caps what a step can show)."""
        kind, fine = node_key(tree, node, greedy)
        if not self.spec.policy_sources:
            return kind, kind
        if fine != kind and self._run.get(request_id, False):
            fine += ":run"
        return kind, fine

    def _blend(self, tries: dict, wins: dict, key: tuple, prior: float) -> float:
        return (wins.get(key, 0.0) + prior * PRIOR_WEIGHT) / (tries.get(key, 0.0) + PRIOR_WEIGHT)

    def alpha(self, kind: str, depth: int, request_id: str | None = None, fine: str | None = None) -> float:
        """Conditional acceptance of a node of `kind` (fine kind `fine`, see node_key) at `depth`
        given its parent was accepted: global coarse -> global fine -> shifted by the sequence's own
        log-odds offset for the node's draft family."""
        fine = fine or kind
        g = PRIOR_ALPHA
        for key in _chain(kind, fine):
            g = self._blend(self._tries, self._wins, (key, depth), g)
        shift = self._seq.get(request_id, {}).get(_family(kind, fine)) if request_id is not None else None
        return g if not shift else 1.0 / (1.0 + math.exp(-(_logit(g) + shift)))

    def node_probs(self, tree: DraftTree, request_id: str | None = None, greedy: bool = True) -> list[float]:
        probs: list[float] = []
        for i, parent in enumerate(tree.parents):
            kind, fine = self._key(tree, i, greedy, request_id)
            a = self.alpha(kind, tree.depths[i], request_id, fine)
            probs.append(a * (probs[parent] if parent >= 0 else 1.0))
        return probs

    def realised(self, seq) -> tuple[float, float]:
        """(accepted tokens, verified nodes) per proposing step of this sequence: its own history
        blended with everyone's, the alpha-chain estimate standing in before any evidence."""
        prior_gain = self.expected_tokens(seq) - 1.0
        g = self._gain.get(_everyone(seq.params.greedy), [0.0, 0.0, 0.0])
        acc = (g[1] + prior_gain * PRIOR_WEIGHT) / (g[0] + PRIOR_WEIGHT)
        nodes = (g[2] + self.spec.depth * PRIOR_WEIGHT) / (g[0] + PRIOR_WEIGHT)
        own = self._gain.get(seq.request_id)
        if own:
            acc = (own[1] + acc * PRIOR_WEIGHT) / (own[0] + PRIOR_WEIGHT)
            nodes = (own[2] + nodes * PRIOR_WEIGHT) / (own[0] + PRIOR_WEIGHT)
        return acc, nodes

    def expected_tokens(self, seq) -> float:
        """Tokens a sequence would emit per step with the full configured chain (its best case)."""
        mode = "" if seq.params.greedy else ":sampled"
        kinds = ({k for k, _ in self._tries if "/" not in k and k.endswith(":sampled") == bool(mode)}
                 or {"lookup" + mode, "scored" + mode})                 # the kinds this draft proposes
        e, p = 1.0, 1.0
        for d in range(1, self.spec.depth + 1):
            p *= max(self.alpha(k, d, seq.request_id) for k in kinds)
            e += p
        return e

    # ------------------------------------------------------------ decisions
    def measured_rates(self, seqs) -> tuple[float | None, float | None]:
        """Measured tokens/s of decode steps like this one (same batch-size bucket and mode),
        (with speculation, without); None where the evidence is thin."""
        bucket, mode = _bucket(len(seqs)), _mode(seqs)
        rates = []
        for speculated in (True, False):
            r = self._rates.get((bucket, mode, speculated))
            rates.append(r[1] / r[2] if r and r[0] >= RATE_MIN_STEPS and r[2] > 0 else None)
        return rates[0], rates[1]

    def choose(self, seqs) -> SpecConfig | None:
        if not self.costs.ready or self.costs.draft_s_per_seq is None:
            return self.spec
        decode = [s for s in seqs if s.num_uncached == 1]
        if not decode:
            return self.spec
        on, off = self.measured_rates(seqs)
        if off is None:                                    # sample steps without speculation now and then
            self._explore += 1
            if self._explore % EXPLORE_OFF_EVERY == 0:
                self.num_steps_off += 1
                return None
        elif on is not None and off > on:                  # measured end to end: speculation loses here
            self._off_steps += 1
            self.num_steps_off += 1
            self.num_steps_off_measured += 1
            if self._off_steps % PROBE_EVERY == 0:
                return self.spec
            return None
        B = len(seqs)
        rows = sum(s.num_step_tokens for s in seqs)
        est = [self.realised(s) for s in decode]
        gain = sum(acc for acc, _ in est)
        nodes = sum(k for _, k in est)
        times = self._step_times(rows, rows + math.ceil(nodes), B)
        t_plain, t_spec = times[0], times[-1] + self.costs.draft_s_per_seq * len(decode)
        if (B + gain) / t_spec >= B / t_plain:
            self._off_steps = 0
            return self.spec
        self._off_steps += 1
        self.num_steps_off += 1
        if self._off_steps % PROBE_EVERY == 0:
            return self.spec                               # probe: fresh acceptance and cost evidence
        return None

    def prune(self, seqs, trees: list[DraftTree], base_tokens: int = 0) -> list[DraftTree]:
        if not self.costs.ready:
            return trees
        cands = []                                        # (p, seq index, node)
        for i, (seq, tree) in enumerate(zip(seqs, trees)):
            if tree is None:
                continue
            self.num_nodes_proposed += len(tree)
            for node, p in enumerate(self.node_probs(tree, seq.request_id, seq.params.greedy)):
                cands.append((p, tree.depths[node], i, node))
        cands.sort(key=lambda c: (-c[0], c[1]))           # a parent's p >= its child's: parents first
        base = base_tokens or len(seqs)                    # rows of the step without nodes
        times = self._step_times(base, base + len(cands), len(seqs))   # times[k]: the step with k more rows
        expected = float(len(seqs))
        best_rate, best_k = expected / times[0], 0
        chosen: list[tuple[int, int]] = []
        taken: set[tuple[int, int]] = set()
        for p, _, i, node in cands:                        # batch tokens/s of every best-first prefix
            parent = trees[i].parents[node]
            if parent >= 0 and (i, parent) not in taken:
                continue                                   # only whole root paths are verifiable
            chosen.append((i, node))
            taken.add((i, node))
            expected += p
            rate = expected / times[len(chosen)]
            if rate > best_rate:
                best_rate, best_k = rate, len(chosen)
        keep: list[set[int]] = [set() for _ in trees]
        for i, node in chosen[:best_k]:
            keep[i].add(node)
        out = []
        for tree, kept in zip(trees, keep):
            if tree is None or len(kept) == len(tree):
                out.append(tree)
            else:
                out.append(subtree(tree, kept))
            self.num_nodes_verified += len(kept)
        return out

    def step_costs(self, num_seqs: int) -> StepCostModel:
        """The cost model of steps of `num_seqs` sequences: that batch-size bucket's own once it has
        BATCH_COST_MIN_OBS steps, else the one over all steps. The same row count costs more over
        more sequences (attention reads every context; draft trees of different sizes attend in
        groups), so one curve keyed by rows alone mixes, e.g., one sequence with 15 tree nodes and
        16 plain sequences."""
        own = self._batch_costs.get(_bucket(num_seqs))
        return own if own is not None and own.num_obs >= BATCH_COST_MIN_OBS else self.costs

    def _step_times(self, first: int, last: int, num_seqs: int) -> list[float]:
        """Step seconds for first..last rows of `num_seqs` sequences: the measured curve, or the
        fitted line (`SpecConfig.policy_costs="linear"`, the model before the curve, for A/Bs)."""
        costs = self.step_costs(num_seqs)
        if self.spec.policy_costs == "linear":
            return [costs.step_time(t) for t in range(first, last + 1)]
        return costs.curve(first, last)

    # ------------------------------------------------------------ learning
    def observe_step(self, num_tokens: int, forward_s: float, num_proposed: int, draft_s: float,
                     num_seqs: int | None = None) -> None:
        self.costs.observe(num_tokens, forward_s)
        if num_seqs:
            self._batch_costs.setdefault(_bucket(num_seqs), StepCostModel()).observe(num_tokens, forward_s)
        if num_proposed:
            self.costs.observe_draft(num_proposed, draft_s)

    def observe(self, seqs, trees, outcomes) -> None:
        for seq, tree, (path, _) in zip(seqs, trees, outcomes):
            if tree is None:
                continue
            everyone = _everyone(seq.params.greedy)
            for key in (everyone, seq.request_id):         # realised gain, empty proposals included
                g = self._gain.setdefault(key, [0.0, 0.0, 0.0])
                decay = 0.99 if key == everyone else 0.9
                g[0], g[1], g[2] = decay * g[0] + 1.0, decay * g[1] + len(path), decay * g[2] + len(tree)
            if not len(tree):
                self._run[seq.request_id] = False
                continue
            own = self._seq.setdefault(seq.request_id, {})
            judged = {-1, *path}                            # nodes whose children the target judged
            accepted = set(path)
            for node, parent in enumerate(tree.parents):
                if parent not in judged:
                    continue
                kind, fine = self._key(tree, node, seq.params.greedy, seq.request_id)
                depth = tree.depths[node]
                win = 1.0 if node in accepted else 0.0
                family = _family(kind, fine)
                pred = self.alpha(kind, depth, seq.request_id, fine)
                own[family] = max(-OWN_MAX, min(OWN_MAX, own.get(family, 0.0) + OWN_LR * (win - pred)))
                for k in _chain(kind, fine):
                    key = (k, depth)
                    self._tries[key] = self._tries.get(key, 0.0) * 0.995 + 1.0
                    self._wins[key] = self._wins.get(key, 0.0) * 0.995 + win
            leaf = bool(path) and not tree.children(path[-1])
            self._run[seq.request_id] = len(path) >= RUN_LONG or (len(path) >= RUN_LEAF and leaf)

    def observe_wall(self, seqs, speculated: bool, tokens: int, seconds: float) -> None:
        """Both kinds of a bucket forget at every step of that bucket, not each at its own steps: the
        rarer kind (probes, or the sampled steps without speculation) would otherwise keep rates
        from minutes ago and be compared with the other kind's recent ones while the machine's
        speed drifts (a `none` engine, whose two kinds are the same steps, read 480 vs 432 tok/s)."""
        bucket, mode = _bucket(len(seqs)), _mode(seqs)
        for kind in (True, False):
            r = self._rates.setdefault((bucket, mode, kind), [0.0, 0.0, 0.0])
            r[0], r[1], r[2] = RATE_DECAY * r[0], RATE_DECAY * r[1], RATE_DECAY * r[2]
            if kind == speculated:
                r[0], r[1], r[2] = r[0] + 1.0, r[1] + tokens, r[2] + seconds

    def release(self, seq) -> None:
        self._seq.pop(seq.request_id, None)
        self._run.pop(seq.request_id, None)
        self._gain.pop(seq.request_id, None)

    def state(self) -> dict:
        a, b = self.costs.coefficients() if self.costs.ready else (None, None)
        return {"adaptive": True, "cost_a_ms": a and 1000 * a, "cost_b_ms": b and 1000 * b,
                "cost_ms_by_rows": self.costs.table_ms(),
                "cost_ms_by_batch": {b: m.table_ms() for b, m in sorted(self._batch_costs.items())},
                "draft_ms_per_seq": self.costs.draft_s_per_seq and 1000 * self.costs.draft_s_per_seq,
                "steps_off": self.num_steps_off,
                "steps_off_measured": self.num_steps_off_measured,
                "measured_tok_s": {f"{b}/{m}/{'spec' if sp else 'plain'}": round(r[1] / r[2], 1)
                                   for (b, m, sp), r in sorted(self._rates.items()) if r[2] > 0},
                "accepted_per_proposal": {("greedy" if g else "sampled"): v[1] / v[0] for g in (True, False)
                                          if (v := self._gain.get(_everyone(g)))},
                "nodes_proposed": self.num_nodes_proposed,
                "nodes_verified": self.num_nodes_verified,
                "alpha": {f"{k}@{d}": round(self.alpha(k, d), 3) for k, d in sorted(self._tries) if "/" not in k},
                "alpha_by_source": {f"{k}@{d}": round(self.alpha(k.split("/")[0], d, fine=k), 3)
                                    for k, d in sorted(self._tries) if "/" in k}}


def _bucket(num_seqs: int) -> str:
    """Batch-size bucket of the measured rates: 1, 2-3, 4-7, 8-15, ..."""
    lo = 1 << (max(num_seqs, 1).bit_length() - 1)
    return str(lo) if lo == 1 else f"{lo}-{2 * lo - 1}"


def _mode(seqs) -> str:
    greedy = {s.params.greedy for s in seqs}
    return "mixed" if len(greedy) > 1 else ("greedy" if greedy.pop() else "sampled")


def subtree(tree: DraftTree, keep: set[int]) -> DraftTree:
    """The nodes in `keep` (closed under ancestors), re-indexed in order; q rows are shared, and
    so are the composed draft's marks (which nodes only the learned branch proposed)."""
    out = DraftTree(q_probs=tree.q_probs, draft_version=tree.draft_version, coverage=tree.coverage)
    remap: dict[int, int] = {}
    for i in sorted(keep):
        parent = tree.parents[i]
        remap[i] = out.add(tree.token_ids[i], remap[parent] if parent >= 0 else -1, tree.logprobs[i], tree.q_rows[i],
                           tree.sources[i])
    out.learned = {remap[i] for i in tree.learned if i in remap}
    return out


def build_policy(spec: SpecConfig, seed: int = 0) -> SpeculationPolicy:
    return AdaptivePolicy(spec, seed) if spec.adaptive else SpeculationPolicy(spec)
