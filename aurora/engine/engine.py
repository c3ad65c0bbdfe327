"""The engine: on the process's compute thread (worker.py), each tick runs
schedule -> propose -> verify -> commit -> publish.

Callers on any thread or event loop submit requests; outputs stream back through
callbacks (`generate` adapts them to an async iterator, `generate_batch` waits).
The engine knows nothing about HTTP; the flywheel attaches through step hooks.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import os
import logging
import threading
import time
from dataclasses import replace

import torch

from aurora.config import EngineConfig
from aurora.drafts import ProposeContext, build_proposer
from aurora.drafts.suffix import find_suffix
from aurora.engine.detok import detokenize
from aurora.engine.isolation import ProposalIsolation
from aurora.engine.policy import build_policy
from aurora.engine.sampling import LazyProbs, make_generator
from aurora.engine.scheduler import Scheduler
from aurora.engine.sequence import Sequence
from aurora.engine.stats import EngineStats
from aurora.engine.step import build_step
from aurora.engine.tree import DraftTree
from aurora.engine.verify import verify_greedy, verify_sampling
from aurora.engine.worker import ComputeThread, run_jobs
from aurora.models.loader import load_model, resolve_device, resolve_dtype
from aurora.models.runner import TargetRunner
from aurora.types import RequestOutput, SamplingParams

log = logging.getLogger("aurora.engine")
FEATURE_WINDOW = 64


class Engine:
    def __init__(self, config: EngineConfig | None = None, **overrides):
        config = replace(config or EngineConfig(), **overrides)
        self.config = config
        self.device = resolve_device(config.device)
        self._lock = threading.Lock()
        self._calls: collections.deque = collections.deque()   # (fn, args, Future) for the compute thread
        self._closed = False
        # Every tensor computation of the engine (loading, compiling, serving, the CPU trainer's
        # units) runs on the process's one compute thread (see worker.py: a second thread's
        # OpenMP pool made every step ~1.7x slower on 2 cores).
        self._compute = ComputeThread.get()
        self._wake = self._compute.wake
        self._compute.call(self._boot)
        self._compute.register(self)

    def _boot(self) -> None:
        config = self.config
        self.dtype = resolve_dtype(config.dtype, self.device)
        torch.set_num_threads(self.serve_threads())
        model, self.tokenizer = load_model(config.model, self.dtype, self.device)
        self.runner = TargetRunner(model, config.num_blocks, config.block_size, config.compile, config.quantize,
                                   config.packed_linears, config.fast_path)
        self.max_model_len = config.max_model_len or self.runner.max_model_len
        self.scheduler = Scheduler(self.runner.cache, config.max_batch, config.prefill_chunk,
                                   config.prefix_cache)
        self.proposer = build_proposer(config.draft, self.runner, config)
        self._isolation = ProposalIsolation(self.proposer)   # rebuilt if `proposer` is replaced
        self.policy = build_policy(config.spec, config.seed)
        self.step_hooks: list = []          # fn(StepView) after every target forward
        self.before_step: list = []         # fn() at each step boundary (weight swaps)
        self.finish_hooks: list = []        # fn(Sequence) when a request ends
        self.stats_extra: dict = {}         # name -> fn() merged into stats()
        suffix = find_suffix(self.proposer)
        if suffix is not None:
            self.stats_extra["suffix"] = suffix.stats
        self._stats = EngineStats()
        self._ids = itertools.count()
        self._inbox: list = []
        self._fwd_s = self._draft_s = 0.0     # last target forward / proposal seconds (cost model)
        self.flywheel = None
        if config.online and self.proposer.learnable:
            from aurora.flywheel import Flywheel
            self.flywheel = Flywheel(self, config.trainer)
        self.runner.warmup(config.max_batch, self.serve_threads())     # compiled path: compile now

    def run_on_worker(self, fn, *args):
        """fn(*args) on the engine's worker thread, between two steps; returns its result or
        raises its exception. Work that computes with torch next to serving (the CPU trainer, a
        baseline measured in the same process) goes through here, so that the process keeps
        one OpenMP pool. Thread-safe; called on the worker itself it just runs fn."""
        return self._compute.submit(self._calls, self._lock, fn, args,
                                    refuse=lambda: "engine is closed" if self._closed else None)

    # ---------------------------------------------------------------- public API
    def encode_prompt(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            ids = list(self.tokenizer.encode(prompt, add_special_tokens=False))
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
        else:
            raise ValueError("prompt must be a string or a list of token ids")
        if not ids:
            raise ValueError("prompt is empty")
        vocab = self.runner.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        limit = min(self.max_model_len - 1, self.runner.cache.allocator.num_blocks * self.config.block_size
                    - self.policy.budget - self.config.block_size)
        if len(ids) > limit:
            raise ValueError(f"prompt has {len(ids)} tokens; this engine accepts at most {limit}")
        return ids

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """Token ids of chat messages through the model's chat template."""
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError("each message needs string 'role' and 'content'")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return self.encode_prompt(list(ids))

    def add_request(self, prompt, params: SamplingParams | None = None, callback=None,
                    request_id: str | None = None) -> str:
        """Queue a request; `callback(RequestOutput)` runs on the engine thread. Thread-safe."""
        if self._closed:
            raise RuntimeError("engine is closed")
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError("params must be a SamplingParams")
        ids = self.encode_prompt(prompt)
        rid = request_id or f"req-{next(self._ids)}"
        seq = Sequence(rid, ids, params, make_generator(params.seed), callback)
        with self._lock:
            self._inbox.append(("add", seq))
        self._wake.set()
        return rid

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._inbox.append(("abort", request_id))
        self._wake.set()

    async def generate(self, prompt, params: SamplingParams | None = None, request_id: str | None = None):
        """Stream `RequestOutput`s (cumulative `text`, plus `delta_text`); the last has finished=True.
        Cancelling the iterator aborts the request and frees its KV."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        rid = self.add_request(prompt, params, lambda out: loop.call_soon_threadsafe(queue.put_nowait, out),
                               request_id)
        finished = False
        try:
            while True:
                out = await queue.get()
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            if not finished:
                self.abort(rid)

    def generate_batch(self, prompts: list, params: SamplingParams | list[SamplingParams] | None = None,
                       timeout: float | None = None) -> list[RequestOutput]:
        """Run many prompts to completion, batched; returns final outputs in order."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        results: dict[int, RequestOutput] = {}
        done = threading.Event()
        if len(params_list) != len(prompts):
            raise ValueError("params list must match prompts")
        encoded = [(i, self.encode_prompt(p), sp) for i, (p, sp) in enumerate(zip(prompts, params_list))]
        for _, _, sp in encoded:                      # validate everything before queueing anything
            if sp is not None and not isinstance(sp, SamplingParams):
                raise ValueError("params must be SamplingParams")
        lock = threading.Lock()

        def make_cb(i):
            def cb(out):
                if out.finished:
                    with lock:
                        results[i] = out
                        if len(results) == len(prompts):
                            done.set()
            return cb
        for i, p, sp in encoded:
            self.add_request(p, sp, make_cb(i))
        if prompts and not done.wait(timeout):
            raise TimeoutError("generate_batch timed out")
        return [results[i] for i in range(len(prompts))]

    def chat(self, messages: list[dict], params: SamplingParams | None = None) -> RequestOutput:
        return self.generate_batch([self.chat_prompt(messages)], params)[0]

    def stats(self) -> dict:
        s = self._stats.snapshot()
        s["draft"] = self.config.draft
        s["draft_version"] = self.proposer.version
        composed_learned = hasattr(self.proposer, "source_stats") and self.proposer.learnable
        if composed_learned:                           # composed draft: learned branch gate
            s["learned_gain"] = self.proposer.gain
            s["learned_gate_open"] = self.proposer.gate_open
        s.update({f"policy_{k}": v for k, v in self.policy.state().items()})
        if composed_learned:                           # per-source marginal gain and cost
            s["draft_sources"] = self.proposer.source_stats()
            s["learned_cost"] = s["draft_sources"]["learned_cost"]
        s["running"] = len(self.scheduler.running)
        s["waiting"] = len(self.scheduler.waiting)
        alloc = self.runner.cache.allocator
        s["kv_blocks_free"] = alloc.num_free
        s["kv_blocks_total"] = alloc.num_blocks
        s["packed_linear_bytes"] = self.runner.packed_bytes   # packed weight copies (config.packed_linears)
        s["fast_path"] = self.runner.fast is not None          # hand-written Llama step (config.fast_path)
        if self.scheduler.prefix is not None:
            s.update(self.scheduler.prefix.stats())
        s.update(self._isolation.stats())
        s["num_forward_retries"] = self._stats.num_forward_retries
        for name, fn in self.stats_extra.items():
            s[name] = fn()
        return s

    def has_work(self) -> bool:
        """Requests running, waiting, or submitted but not yet taken in by the compute thread (a
        trainer must count those as busy, or its next unit runs ahead of their first step)."""
        return bool(self._inbox) or self.scheduler.has_work

    def machine_busy(self) -> bool:
        """Whether any engine on this process's compute thread has requests to serve."""
        return self._compute.busy()

    def machine_idle_s(self) -> float:
        """Seconds since any engine on this process's compute thread last stepped (0 while busy)."""
        return self._compute.idle_s()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        with self._lock:
            self._closed = True
        self._compute.unregister(self)                       # no step of this engine runs after this
        with self._lock:                                     # never ran: their callers get an error
            pending, self._calls = list(self._calls), collections.deque()
        for _, _, future in pending:
            future.set_exception(RuntimeError("engine is closed"))
        if self.flywheel is not None:
            self.flywheel.close()
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            self._finish(seq, "abort")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---------------------------------------------------------------- worker loop
    def serve_threads(self) -> int:
        """Torch threads of the engine worker (thread-local). CPU default: every core — serving
        keeps them all while it has work; the flywheel's trainer takes a bounded share of time
        (TrainerConfig.busy_share) while serving is busy and the whole machine when it is idle."""
        if self.config.threads:
            return self.config.threads
        if self.device.type != "cpu":
            return torch.get_num_threads()
        return max(1, os.cpu_count() or 1)

    def tick(self) -> bool:
        """One turn on the compute thread: queued calls, new requests, one step if there is work.
        Returns whether it stepped."""
        run_jobs(self._calls, self._lock)                    # e.g. the CPU trainer's unit of work
        self._drain_inbox()
        if self._closed or not self.scheduler.has_work:
            return False
        try:
            self.step()
        except Exception as exc:
            # Draft, target-forward and hook failures are isolated per sequence inside the
            # step (_propose, _forward, _verify, _guarded). What reaches here (scheduling or
            # commit bookkeeping) cannot be attributed: the step's requests end with an
            # error, their KV is freed, and the engine keeps serving new requests.
            log.exception("engine step failed")
            for seq in list(self.scheduler.running):
                self._finish(seq, "error", f"internal error: {exc}")
        return True

    def _drain_inbox(self) -> None:
        with self._lock:
            items, self._inbox = self._inbox, []
        for kind, item in items:
            if kind == "add":
                self._stats.num_requests += 1
                self._stats.num_prompt_tokens += len(item.prompt_ids)
                self.scheduler.add(item)
            else:
                for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
                    if seq.request_id == item:
                        self._finish(seq, "abort")

    # ---------------------------------------------------------------- one step
    def step(self) -> None:
        """schedule -> propose -> verify -> commit -> publish."""
        for fn in self.before_step:
            _guarded(fn)
        t0 = time.perf_counter()
        seqs = self.scheduler.schedule(self.policy.budget)
        if not seqs:
            self._drop_unschedulable()
            return
        # the policy's end-to-end evidence: decode-only steps, for a policy that reads it
        timed = self.policy.reads_step_rates and all(s.num_uncached == 1 for s in seqs)
        emitted = sum(s.num_output for s in seqs) if timed else 0
        trees = self._propose(seqs)
        t1 = time.perf_counter()
        self._draft_s = t1 - t0
        settle_s = sum(self._settle(*group) for group in self._forward(seqs, trees))
        t2 = time.perf_counter()
        if timed:
            self.policy.observe_wall(seqs, any(t is not None for t in trees),
                                     sum(s.num_output for s in seqs) - emitted, t2 - t0)
        st = self._stats
        st.num_steps += 1
        st.draft_s += t1 - t0
        st.verify_s += t2 - t1 - settle_s
        st.busy_s += t2 - t0

    def _settle(self, seqs, trees, batch, result, rows) -> float:
        """verify -> hooks -> commit for one forward's sequences; returns seconds after verifying."""
        outcomes = self._verify(seqs, trees, result, rows)
        t = time.perf_counter()
        if all(r.num_uncached == 1 for r in rows):       # the cost model learns from decode steps
            self.policy.observe_step(int(batch.input_ids.shape[0]), self._fwd_s,
                                     sum(tr is not None for tr in trees), self._draft_s, len(seqs))
        self.policy.observe(seqs, trees, outcomes)
        view = StepView(seqs, trees, batch, result, rows, outcomes, self.proposer.version)
        _guarded(self.proposer.on_step, seqs, batch, result, rows)     # a draft or trainer hook that
        _guarded(self.proposer.observe, trees, outcomes)               # fails must not cost the tokens
        for fn in self.step_hooks:
            _guarded(fn, view)
        self._commit(seqs, trees, result, rows, outcomes)
        return time.perf_counter() - t

    # -------------------------------------------------- isolation: draft and target failures
    def _propose(self, seqs: list[Sequence]) -> list[DraftTree | None]:
        """Trees for decode-phase sequences; a failing draft costs only the sequences it fails
        for their speculation (see `isolation.py`), never their tokens."""
        spec = self.policy.choose(seqs)
        decode = [s for s in seqs if s.num_uncached == 1]
        if spec is None or not decode:
            return [None] * len(seqs)
        if self._isolation.proposer is not self.proposer:
            self._isolation = ProposalIsolation(self.proposer)
        proposed = self._isolation.propose(decode, ProposeContext(spec, self.runner.vocab_size))
        proposed = self.policy.prune(decode, proposed, base_tokens=sum(s.num_step_tokens for s in seqs))
        by_id = {id(s): t for s, t in zip(decode, proposed)}
        return [by_id.get(id(s)) for s in seqs]

    @property
    def _tail(self) -> bool:
        """Whether a step may run its last layer for the logits rows only (step.py, `tail`): the
        runner's forward uses a tail (`TargetRunner.supports_tail`; elsewhere none is built) and no
        step hook is attached (a hook, e.g. the flywheel's trace collector, may read every row's
        hidden state)."""
        return self.runner.supports_tail and not self.step_hooks

    def _forward(self, seqs, trees):
        """Yield (seqs, trees, batch, result, rows) groups covering `seqs`: normally one batched
        forward. If it raises, retry once without draft trees (a bad tree cannot be the cause);
        if that raises too, run each sequence alone: one that fails alone ends with an error,
        the others get their tokens (a failure only the batch shows costs speed, not requests).
        A retry rewrites the same KV slots, so a half-run forward leaves nothing behind."""
        attempts = [trees]
        if any(t is not None and len(t) for t in trees):
            attempts.append([None] * len(seqs))
        for group_trees in attempts:
            try:
                batch, rows = build_step(seqs, group_trees, self.config.block_size, self.device, self._tail)
                t = time.perf_counter()
                result = self.runner.forward(batch)
                self._fwd_s = time.perf_counter() - t
            except Exception:
                log.exception("target forward failed for a batch of %d sequences", len(seqs))
                self._stats.num_forward_retries += 1
                continue
            yield seqs, group_trees, batch, result, rows
            return
        none = [None]
        for seq in seqs:
            try:
                batch, rows = build_step([seq], none, self.config.block_size, self.device, self._tail)
                t = time.perf_counter()
                result = self.runner.forward(batch)
                self._fwd_s = time.perf_counter() - t
            except Exception as exc:
                log.exception("target forward failed for %s alone", seq.request_id)
                self._finish(seq, "error", f"internal error: target forward failed: {exc}")
                continue
            yield [seq], none, batch, result, rows

    @staticmethod
    def _sampled_roots(seqs, rows, logits) -> dict:
        """id(seq) -> its root's processed row, computed together for sequences that sample with
        the same parameters (a failure here leaves each sequence to compute its own)."""
        groups: dict[tuple, list] = {}
        for seq, r in zip(seqs, rows):
            if not seq.params.greedy and r.num_uncached == seq.num_uncached:
                p = seq.params
                groups.setdefault((p.temperature, p.top_k, p.top_p), []).append((seq, r.logit_start))
        out = {}
        for members in groups.values():
            if len(members) < 2:
                continue
            try:
                computed = LazyProbs.roots(logits, [start for _, start in members], members[0][0].params)
            except Exception:                             # e.g. a row of nan logits
                log.debug("sampled roots of %d sequences failed together; each computes its own",
                          len(members), exc_info=True)
                continue
            out.update((id(seq), row) for (seq, _), row in zip(members, computed))
        return out

    def _verify(self, seqs, trees, result, rows) -> list[tuple[list[int], int]]:
        logits = result.logits                                   # [R, V]
        greedy_rows = [i for i, s in enumerate(seqs) if s.params.greedy]
        argmax = logits.argmax(-1).tolist() if greedy_rows else None   # one transfer per step
        roots = self._sampled_roots(seqs, rows, logits)
        outcomes = []
        for seq, tree, r in zip(seqs, trees, rows):
            if r.num_uncached < seq.num_uncached:             # a prompt chunk: nothing to sample yet
                outcomes.append(([], -1))
                continue
            tree = tree or DraftTree()
            sl = slice(r.logit_start, r.logit_start + 1 + r.num_nodes)
            try:
                if seq.params.greedy:
                    outcomes.append(verify_greedy(tree, argmax[sl]))
                else:
                    probs = LazyProbs(logits[sl], seq.params, roots.get(id(seq)))   # the accepted path's rows only
                    outcomes.append(verify_sampling(tree, probs, seq.generator))
            except Exception as exc:                      # fail this request only
                log.exception("verification failed for %s", seq.request_id)
                self._finish(seq, "error", f"sampling failed: {exc}")
                outcomes.append(([], 0))
        return outcomes

    def _commit(self, seqs, trees, result, rows, outcomes) -> None:
        cache = self.runner.cache
        version = self.proposer.version
        for seq, tree, r, (path, bonus) in zip(seqs, trees, rows, outcomes):
            if seq.finished:
                continue
            if r.num_uncached < seq.num_uncached:             # a prompt chunk: cache it, emit nothing
                if self._needs_features:
                    self._keep_features(seq, result, r, [])
                seq.num_cached += r.num_uncached
                self.scheduler.commit(seq)
                continue
            decode = seq.num_cached > 0 and r.num_uncached == 1                      # prefill/recompute steps are not decode steps
            base = seq.num_cached + r.num_uncached                # first slot after the root
            if path:
                src = cache.slots_at(seq.block_ids, [base + n for n in path])
                dst = cache.slots(seq.block_ids, base, base + len(path))
                if src != dst:
                    cache.move(src, dst)
            if self._needs_features:
                self._keep_features(seq, result, r, path)
            seq.num_cached = base + len(path)
            new_tokens = [tree.token_ids[n] for n in path] + [bonus] if path else [bonus]
            seq.draft_version = version
            if decode:
                seq.num_steps += 1
                seq.num_decode_tokens += len(new_tokens)
                self._stats.record_tree(tree.max_depth() if tree else 0, len(path), len(new_tokens))
            if seq.first_token_time is None:
                seq.first_token_time = time.perf_counter()
            self._append(seq, new_tokens)
            if not seq.finished:
                self.scheduler.trim(seq)
                self.scheduler.commit(seq)

    @property
    def _needs_features(self) -> bool:
        """Only drafts that read target features (learned heads) get the per-sequence window."""
        return getattr(self.proposer, "needs_features", self.proposer.learnable)

    @staticmethod
    def _keep_features(seq: Sequence, result, r, path: list[int]) -> None:
        feats = [result.features[r.start:r.start + r.num_uncached]]
        if path:
            idx = torch.tensor([r.start + r.num_uncached + n for n in path], device=result.features.device)
            feats.append(result.features[idx])
        old = seq.features if seq.features is not None else feats[0][:0]
        seq.features = torch.cat([old, *feats])[-FEATURE_WINDOW:]

    def _append(self, seq: Sequence, new_tokens: list[int]) -> None:
        p = seq.params
        eos = getattr(self.tokenizer, "eos_token_id", None)
        reason = None
        added = 0
        room = min(p.max_tokens - seq.num_output, self.max_model_len - len(seq.token_ids))
        for tok in new_tokens:
            seq.token_ids.append(tok)
            added += 1
            if (not p.ignore_eos and tok == eos) or tok in p.stop_token_ids:
                reason = "stop"
            elif added >= room:
                reason = "length"
            if reason:
                break
        self._stats.num_tokens += added
        text = detokenize(self.tokenizer, seq, final=reason is not None)
        if p.stop:
            scan_from = max(0, len(seq.emitted_text) - max(len(s) for s in p.stop))
            hits = [i for i in (text.find(s, scan_from) for s in p.stop) if i >= 0]
            if hits:
                text, reason = text[:min(hits)], "stop"
        if reason:
            self._finish(seq, reason, text=text)
        else:
            self._emit(seq, text, finished=False)

    def _emit(self, seq: Sequence, text: str, finished: bool) -> None:
        if not finished:
            if text.endswith("\ufffd"):
                return                                         # wait for the rest of a UTF-8 char
            if seq.params.stop:                                # hold back a possible stop-string prefix
                hold = max(len(s) for s in seq.params.stop) - 1
                text = text[:max(len(seq.emitted_text), len(text) - hold)]
                if len(text) == len(seq.emitted_text):
                    return
        ids = seq.output_ids                                   # one copy per emitted step
        out = RequestOutput(
            request_id=seq.request_id, prompt_token_ids=seq.prompt_ids, token_ids=ids, text=text,
            delta_token_ids=ids[seq.num_emitted:], delta_text=text[len(seq.emitted_text):],
            finished=finished, finish_reason=seq.finish_reason, error=seq.error,
            stats=seq.stats() if finished else {})
        seq.emitted_text, seq.num_emitted = text, len(ids)
        if seq.callback is not None:
            try:
                seq.callback(out)
            except Exception:
                log.exception("request callback failed; aborting %s", seq.request_id)
                if not finished:
                    self._finish(seq, "abort")

    def _finish(self, seq: Sequence, reason: str, error: str | None = None, text: str | None = None) -> None:
        if seq.finished:
            return
        self.scheduler.finish(seq)
        _guarded(self.proposer.release, seq)
        self.policy.release(seq)
        for fn in self.finish_hooks:
            try:
                fn(seq)
            except Exception:
                log.exception("finish hook failed")
        seq.finish_reason, seq.error = reason, error
        self._stats.num_finished += 1
        self._stats.num_errors += reason == "error"
        self._stats.num_preemptions += seq.num_preemptions
        if text is None:
            text = detokenize(self.tokenizer, seq, final=True)
        self._emit(seq, text, finished=True)

    def _drop_unschedulable(self) -> None:
        """A lone waiting request that cannot fit even in an empty cache ends with 'length'."""
        if self.scheduler.waiting and not self.scheduler.running:
            seq = self.scheduler.waiting[0]
            self._finish(seq, "length" if seq.output_ids else "error",
                         None if seq.output_ids else "request does not fit in the KV cache")


def _guarded(fn, *args) -> None:
    """Run a hook; log (never raise) its failure: hooks observe a step, they cannot undo it."""
    try:
        fn(*args)
    except Exception:
        log.exception("hook %s failed", getattr(fn, "__qualname__", fn))


class StepView:
    """What one target forward produced, handed to step hooks (the flywheel's traces)."""
    __slots__ = ("seqs", "trees", "batch", "result", "rows", "outcomes", "draft_version")

    def __init__(self, seqs, trees, batch, result, rows, outcomes, draft_version):
        self.seqs, self.trees, self.batch, self.result = seqs, trees, batch, result
        self.rows, self.outcomes, self.draft_version = rows, outcomes, draft_version
