"""`aurora pretrain-draft`: a day-0 draft from installed corpora, so the flywheel does not start
from nothing. Distil the target on ShareGPT text, train the EAGLE-3 head on it, save a
checkpoint that `draft="eagle:<dir>"`, `aurora demo --checkpoint` and the bench's `online-ckpt` load.

Distillation is prefill only, no generation: each conversation (chat template, user and
assistant turns, up to `--max-len` tokens) runs through the target once; every position keeps
the target's features (the three tapped layers) and its top-16 next-token distribution,
exactly the trace format verification writes, so the online trainer's own code trains on it:
    loss = sum_rows KL(p_target(. | x_<=i+1) || q_draft(. | f_<=i, x_i+1))   (imitation, unrolled)
The text is ChatGPT's, not the target's, so the contexts differ from live traffic while the
labels are the target's own distribution. Conversations whose first user turn is one of the
bench/demo prompts (`load_domain(d, 100, seed)` for seeds 0-3) are skipped.

`--replies N` adds the target's *own* text: N held-apart prompts of the bench domains (code,
finance, math, chat; none a bench/demo prompt), every other one sent as raw text (as
`aurora bench --stream` serves it) and the rest through the chat template (as a chat client and
`make demo` do), each answered greedily by the target for `--reply-tokens` tokens and distilled
whole (`--reply-domains` narrows the domains, e.g. to the one a deployment mostly serves). Live
traffic is the target continuing such prompts, not ChatGPT's replies. `--init DIR`
trains on from a saved draft (its vocabulary and weights), so a replies stage runs on top of the
ShareGPT draft: `make draft` builds both (docs/RESULTS.md, "A day-0 draft").

Reports simulated greedy chain tau (the guard's score, unroll 3, at most 4) on held-out
conversations and, with `--traces`, on real serving traces (examples/flywheel_ab.py --collect).
Defaults (2,000 conversations, 5,000 steps, lr 1e-3 with a cosine decay to a tenth) are the
best measured on the 2-core CPU: ~15-29 min distilling + ~38-58 min training; held-out tau 1.00 -> 1.65.
More data kept helping (400 conversations / 1,500 steps: 1.45; 1,000 / 3,000: 1.53; docs/RESULTS.md,
"A day-0 draft").

    aurora pretrain-draft                      # -> ~/.cache/aurora/drafts/<model>-day0/
    aurora demo --checkpoint ~/.cache/aurora/drafts/smollm2-135m-day0
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from aurora.workloads.corpora import SHAREGPT_DOMAINS as REPLY_DOMAINS

HELD_CONVS = 20
ROLES = {"human": "user", "gpt": "assistant"}
PROGRESS_S = 20.0                # seconds between progress lines
DEFAULT_CONVS, DEFAULT_STEPS = 2000, 5000
S_PER_CONV, S_PER_STEP = 0.45, 0.45   # eta_text: seconds per distilled conversation / optimizer step
LR_FLOOR = 0.1                   # cosine schedule: the last step's rate, as a fraction of --lr
REPLIES_STAGE = "--convs 420 --replies 800 --steps 1500 --lr 3e-4"   # `make draft`'s stage 2 (DAY0_REPLIES)


def default_day0_dir(model: str) -> Path:
    """Where `aurora pretrain-draft` (and `make demo`) keep the day-0 draft of `model`."""
    from aurora.flywheel.checkpoint import default_draft_dir
    d = default_draft_dir(model)
    return d.with_name(d.name + "-day0")


def bench_prompts() -> set[str]:
    """First 200 characters of every prompt the bench and demo may draw (kept out of training)."""
    from aurora.workloads.corpora import SHAREGPT_DOMAINS, load_domain
    out = set()
    for seed in range(4):
        for d in SHAREGPT_DOMAINS:
            out |= {p.text[:200] for p in load_domain(d, 100, seed=seed)}
    return out


def conversations(tokenizer, skip: set[str], turns: int):
    """Chat-template text of ShareGPT conversations (first `turns` messages)."""
    from aurora.workloads.corpora import iter_sharegpt_records
    for rec in iter_sharegpt_records():
        msgs = []
        for m in rec.get("conversations") or []:
            role = ROLES.get(m.get("from"))
            if role is None or not m.get("value"):
                break
            msgs.append({"role": role, "content": m["value"]})
        if len(msgs) < 2 or msgs[0]["role"] != "user" or msgs[0]["content"][:200] in skip:
            continue
        yield tokenizer.apply_chat_template(msgs[:turns], tokenize=False)


@torch.inference_mode()
def distil(runner, ids: list[int]):
    """One prefill of `ids` through the target (plain SDPA, no KV pool): a trace record whose
    every position has features and the target's top-k next-token distribution."""
    from aurora.flywheel.traces import TOP_K, TraceRecord
    from aurora.models.runner import ATTN_NAME, set_attn
    set_attn(runner.model, "sdpa")
    try:
        out = runner.model.model(input_ids=torch.tensor(ids, device=runner.device)[None], use_cache=False,
                                 output_hidden_states=True)
    finally:
        set_attn(runner.model, ATTN_NAME)
    n = len(ids) - 1
    feats = torch.cat([out.hidden_states[i + 1][0] for i in runner.feature_layers], -1)[:n]   # [n, 3H]
    top = torch.softmax(runner.logits_from_hidden(out.last_hidden_state[0, :n]), -1).topk(TOP_K, -1)
    return TraceRecord(request_id="corpus", token_ids=list(ids), features=feats.to(torch.bfloat16).cpu(),
                       target_ids=top.indices.int().cpu(), target_probs=top.values.half().cpu(), rejected=[])


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="aurora pretrain-draft", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default=None,
                    help="checkpoint directory (default: ~/.cache/aurora/drafts/<model>-day0/)")
    ap.add_argument("--force", action="store_true", help="replace a draft already saved in --out")
    ap.add_argument("--convs", type=int, default=DEFAULT_CONVS, help=f"conversations distilled (the last "
                    f"{HELD_CONVS} held out; default {DEFAULT_CONVS})")
    ap.add_argument("--max-len", type=int, default=512, help="tokens per conversation (default 512)")
    ap.add_argument("--turns", type=int, default=4, help="messages per conversation (default 4)")
    ap.add_argument("--replies", type=int, default=0, help="also distil the target's own greedy replies to this "
                    f"many held-apart prompts of the bench domains (the last {HELD_CONVS} held out; default 0)")
    ap.add_argument("--reply-tokens", type=int, default=96, help="tokens per generated reply (default 96)")
    ap.add_argument("--reply-domains", default=",".join(REPLY_DOMAINS),
                    help="comma-separated domains the reply prompts come from, spread evenly (default "
                         f"{','.join(REPLY_DOMAINS)}; e.g. `code` adapts a draft to code-heavy traffic)")
    ap.add_argument("--init", help="train on from the draft saved in this directory (its vocabulary and "
                    "weights) instead of a fresh head")
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"optimizer steps (default {DEFAULT_STEPS})")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--schedule", default="cosine", choices=("cosine", "constant"),
                    help="learning rate over the run: cosine decay to a tenth of --lr (default), or constant")
    ap.add_argument("--evals", type=int, default=3, help="held-out scores along the run (default 3)")
    ap.add_argument("--traces", help="real serving traces to score on too (examples/flywheel_ab.py --collect)")
    ap.add_argument("--no-save", action="store_true", help="measure only, write nothing")
    return ap


def older_recipe_note(path) -> str | None:
    """One line when the day-0 draft saved at `path` was built from fewer conversations than
    today's default (a weaker draft, e.g. one from before session 19) or without the target-replies
    stage (before session 28), else None."""
    try:
        meta = json.loads((Path(path).expanduser() / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or "ShareGPT" not in str(meta.get("source", "")):
        return None                                   # not a corpus-distilled day-0 draft
    pre = meta.get("pretrain") or {}
    convs = pre.get("convs")                          # absent: saved before the recipe was recorded
    base = ((pre.get("init") or {}).get("pretrain") or {}).get("convs")   # trained on from a base draft
    if isinstance(convs, int) and isinstance(base, int):
        convs = max(convs, base)
    if isinstance(convs, int) and convs >= DEFAULT_CONVS:
        if pre.get("replies"):
            return None
        return (f"this day-0 draft has not trained on the target's own replies (stage 2 of `make draft`, "
                f"docs/RESULTS.md, \"A day-0 draft\"): `aurora pretrain-draft --force --init {path} --out {path} "
                f"{REPLIES_STAGE}` adds it (30-50 min on 2 CPU cores)")
    built = f"from {convs} conversations" if isinstance(convs, int) else "by an older recipe"
    return (f"this day-0 draft was distilled {built}; the current recipe distils {DEFAULT_CONVS} "
            f"conversations and serves a stronger draft (docs/RESULTS.md, \"A day-0 draft\"): "
            f"`aurora pretrain-draft --force --out {path}` rebuilds it ({eta_text(DEFAULT_CONVS, DEFAULT_STEPS)})")


def eta_text(convs: int, steps: int) -> str:
    """A rough duration for SmolLM2-135M on 2 CPU cores (measured in session 19: 0.34-0.48 s per
    conversation distilled, 0.42-0.47 s per optimizer step; session 26, another 2-core EPYC:
    0.87 s and 0.70 s). The lower end, and how much longer a slower machine takes."""
    lo = f"{convs * S_PER_CONV / 60:.0f} + {steps * S_PER_STEP / 60:.0f}"
    return f"about {lo} min for SmolLM2-135M on 2 CPU cores (up to ~1.7x that on a slower machine)"


def _say(msg: str) -> None:
    print(f"aurora pretrain-draft: {msg}", flush=True)


def distil_all(eng, texts, n: int, what: str) -> list:
    """Distil the first `n` token lists of `texts` (an iterable of id lists), with a progress
    line every ~20 s; ValueError when `texts` runs out first."""
    t0 = last = time.perf_counter()
    recs = []
    for ids in texts:
        if len(recs) >= n:
            break
        recs.append(eng.run_on_worker(distil, eng.runner, ids))
        now = time.perf_counter()
        if now - last >= PROGRESS_S:
            last, done = now, len(recs)
            _say(f"distilled {done}/{n} {what} ({now - t0:.0f} s, ~{(now - t0) / done * (n - done):.0f} s left)")
    if len(recs) < n:
        raise ValueError(f"the corpus held only {len(recs)} usable {what}, fewer than the {n} asked for")
    return recs


def distil_corpus(eng, convs: int, max_len: int, turns: int, skip: set[str]) -> list:
    """`convs` distilled conversations (>= 32 tokens each), none opening with a prompt in `skip`."""
    tok = eng.tokenizer
    texts = (tok.encode(t, add_special_tokens=False)[:max_len] for t in conversations(tok, skip, turns))
    return distil_all(eng, (ids for ids in texts if len(ids) >= 32), convs, "conversations")


def reply_prompts(n: int, skip: set[str], seed: str = "pretrain", domains=None) -> list:
    """`n` prompts spread evenly over `domains` (default: the four ShareGPT-backed ones; code =
    HumanEval + stdlib + ShareGPT-code), none whose first 200 characters is a bench/demo prompt's
    (`skip`); domains that run short are made up from the others."""
    from aurora.workloads.corpora import load_domain, sharegpt_subsets
    pools = []
    for d in domains or REPLY_DOMAINS:
        k = n if d == "code" else min(n, len(sharegpt_subsets()[d]))
        pools.append([p for p in load_domain(d, k, seed=seed) if p.text[:200] not in skip])
    out = []
    while len(out) < n and any(pools):
        out += [pool.pop() for pool in pools if pool][:n - len(out)]
    return out


def target_replies(eng, prompts: list, tokens: int, max_len: int, n: int) -> list[list[int]]:
    """The target's own greedy replies: prompt ids + up to `tokens` generated ids, for the first
    `n` usable prompts.
    Every other prompt is served as raw text (as `aurora bench --stream` sends it), the rest
    through the chat template when it has messages (as a chat client and `make demo` send it).
    Raw prompts are cut to their first `max_len - tokens` tokens; longer chat prompts are left out."""
    from aurora import SamplingParams
    from aurora.bench.run import encode
    tok, room = eng.tokenizer, max_len - tokens
    ids = [list(tok.encode(p.text, add_special_tokens=False))[:room] if i % 2 == 0 else encode(tok, p)
           for i, p in enumerate(prompts)]
    ids = [x for x in ids if 8 <= len(x) <= room][:n]
    out, t0, last, batch = [], time.perf_counter(), time.perf_counter(), 64
    params = SamplingParams(max_tokens=tokens, temperature=0.0)
    for i in range(0, len(ids), batch):
        chunk = ids[i:i + batch]
        out += [x + list(o.token_ids) for x, o in zip(chunk, eng.generate_batch(chunk, params))]
        if time.perf_counter() - last >= PROGRESS_S:
            last, el = time.perf_counter(), time.perf_counter() - t0
            _say(f"generated {len(out)}/{len(ids)} target replies ({el:.0f} s, "
                 f"~{el / len(out) * (len(ids) - len(out)):.0f} s left)")
    return out


def lr_at(step: int, steps: int, lr: float, schedule: str) -> float:
    """The learning rate of optimizer step `step` of `steps`: constant, or cosine from `lr`
    at step 0 down to `LR_FLOOR * lr` at step `steps` (the last step trained is steps - 1):  lr * (f + (1 - f) * (1 + cos(pi * step / steps)) / 2)."""
    if schedule == "constant" or steps <= 1:
        return lr
    return lr * (LR_FLOOR + (1 - LR_FLOOR) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps)))


def train_head(eng, train: list, sets: dict, steps: int, lr: float, evals: int, schedule: str,
               init=None):
    """Train a head on `train` with the learning rate `lr_at` gives each step: the head `init`
    (its vocabulary and weights, trained on), or a fresh one (corpus vocabulary, target-initialised
    LM head). Score it on each of `sets` (name -> records) `evals` times. -> (trainer, curve)."""
    from aurora import TrainerConfig
    from aurora.flywheel.trainer import Trainer
    from aurora.flywheel.vocab import VocabCounter, init_from_target
    from aurora.models.eagle import build_head
    runner = eng.runner
    cfg = TrainerConfig(lr=lr, max_passes=1e9, replay_records=len(train), holdout_every=0)
    if init is not None:
        head = init
    else:
        counts = VocabCounter(runner.vocab_size)
        for r in train:
            counts.update(r.token_ids)
        head = build_head(runner, cfg.draft_vocab, cfg.seed)
        head.d2t.copy_(counts.top(head.draft_vocab, head.d2t))     # the corpus's most frequent tokens
        init_from_target(head, runner)
    tr = Trainer(head, runner, cfg)
    tr.add_records(train)
    windows = {k: tr.eval_windows(v) for k, v in sets.items() if v}
    curve, t1, last = [], time.perf_counter(), time.perf_counter()
    every = max(1, steps // max(1, evals))
    for step in range(steps + 1):
        if step % every == 0 or step == steps:
            point = {"step": step, "rows": tr.tokens_trained, "s": round(time.perf_counter() - t1)}
            point |= {f"tau_{k}": round(tr.evaluate(tr.head, w), 3) for k, w in windows.items()}
            curve.append(point)
            _say("scored " + json.dumps(point))
        elif time.perf_counter() - last >= PROGRESS_S:
            last, el = time.perf_counter(), time.perf_counter() - t1
            _say(f"step {step}/{steps}, loss {tr.last_losses.get('total', float('nan')):.3f} "
                 f"({el:.0f} s, ~{el / step * (steps - step):.0f} s left)")
        if step < steps:
            for group in tr.opt.param_groups:
                group["lr"] = lr_at(step, steps, lr, schedule)
            tr.optimizer_step()
    return tr, curve


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    if args.convs <= HELD_CONVS:
        ap.error(f"--convs must exceed the {HELD_CONVS} held-out conversations")
    if args.replies and (args.replies <= HELD_CONVS or not 8 <= args.reply_tokens <= args.max_len - 16):
        ap.error(f"--replies must be 0 or exceed the {HELD_CONVS} held-out replies, and --reply-tokens lie "
                 "in [8, --max-len - 16]")
    if args.steps < 1 or args.lr <= 0 or args.max_len < 32:
        ap.error("--steps must be >= 1, --lr > 0, --max-len >= 32")
    domains = tuple(d.strip() for d in args.reply_domains.split(",") if d.strip())
    if not domains or set(domains) - set(REPLY_DOMAINS):
        ap.error(f"--reply-domains must name some of {', '.join(REPLY_DOMAINS)}, got {args.reply_domains!r}")
    from aurora import Engine, EngineConfig
    from aurora.flywheel.checkpoint import has_checkpoint, load_head, save_head
    from aurora.flywheel.traces import TraceRecord
    out = None if args.no_save else Path(args.out or default_day0_dir(args.model)).expanduser()
    if out is not None and has_checkpoint(out) and not args.force:
        ap.error(f"{out} already holds a draft (--force replaces it, --out picks another directory)")
    real = [TraceRecord(**d) for d in torch.load(args.traces, weights_only=False)] if args.traces else []

    t0 = time.perf_counter()
    replies = f" and the target's replies to {args.replies} prompts" if args.replies else ""
    _say(f"{args.model}: distilling {args.convs} ShareGPT conversations{replies} through the target, then "
         f"{args.steps} training steps ({eta_text(args.convs + args.replies, args.steps)})")
    eng = Engine(EngineConfig(model=args.model, draft="ngram" if args.replies else "none", online=False))
    try:
        init, base = None, {}
        if args.init:
            init, base = load_head(args.init, eng.runner)
            if tuple(base.get("feature_layers") or ()) not in ((), tuple(eng.runner.feature_layers)):
                raise ValueError(f"--init {args.init}: its feature layers {base['feature_layers']} are not "
                                 f"this target's {list(eng.runner.feature_layers)}")
        skip = bench_prompts()                       # read once: both corpora keep out of it
        recs = distil_corpus(eng, args.convs, args.max_len, args.turns, skip)
        held, train = recs[-HELD_CONVS:], recs[:-HELD_CONVS]
        sets = {"held": held, "real": real}
        if args.replies:
            prompts = reply_prompts(args.replies * 3 // 2, skip, domains=domains)   # room for long chat prompts
            ids = target_replies(eng, prompts, args.reply_tokens, args.max_len, args.replies)
            reps = distil_all(eng, iter(ids), args.replies, "target replies")
            train, sets["held_replies"] = train + reps[:-HELD_CONVS], reps[-HELD_CONVS:]
            recs += reps
        report = {"convs": args.convs, "replies": args.replies,
                  **({"reply_domains": list(domains)} if args.replies and domains != REPLY_DOMAINS else {}),
                  "positions": sum(len(r.features) for r in recs),
                  "distil_s": round(time.perf_counter() - t0, 1)}
        if args.init:
            report["init"] = {"path": str(args.init), "pretrain": base.get("pretrain")}
        _say(json.dumps(report))
        tr, curve = eng.run_on_worker(train_head, eng, train, sets, args.steps, args.lr, args.evals,
                                      args.schedule, init)
        report |= {"steps": tr.steps, "lr": args.lr, "schedule": args.schedule,
                   "rows_trained": tr.tokens_trained, "curve": curve, "wall_s": round(time.perf_counter() - t0, 1)}
        if out is not None:
            head = tr.head.to(eng.runner.dtype).eval()
            source = "aurora pretrain-draft (ShareGPT" + (" + target replies)" if args.replies else ")")
            save_head(head, out, {"feature_layers": list(eng.runner.feature_layers), "version": 0,
                                  "trainer_steps": tr.steps + int(base.get("trainer_steps") or 0), "source": source,
                                  "pretrain": {k: v for k, v in report.items() if k != "curve"}})
            report["out"] = str(out)
    finally:
        eng.close()
    print(json.dumps(report), flush=True)
    if out is not None:
        _say(f"saved the day-0 draft to {out} in {report['wall_s']:.0f} s; serve it with "
             f"--draft eagle:{out}+ngram, or `aurora demo --checkpoint {out}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
