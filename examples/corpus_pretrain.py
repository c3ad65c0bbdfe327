"""A day-0 draft from installed corpora: distil the target on ShareGPT text, train the EAGLE-3
head on it, save a checkpoint that `draft="eagle:<dir>"` (and `online-ckpt` in the bench) loads.

Distillation is prefill only, no generation: each conversation (chat template, user and
assistant turns, up to `--max-len` tokens) runs through the target once; every position keeps
the target's features (the three tapped layers) and its top-16 next-token distribution,
exactly the trace format verification writes, so the online trainer's own code trains on it:
    loss = sum_rows KL(p_target(. | x_<=i+1) || q_draft(. | f_<=i, x_i+1))   (imitation, unrolled)
The text is ChatGPT's, not the target's, so the contexts differ from live traffic while the
labels are the target's own distribution. Conversations whose first user turn is one of the
bench/demo prompts (`load_domain(d, 100, seed)` for seeds 0-3) are skipped.

Reports simulated greedy chain tau (the guard's score, unroll 3, at most 4) on held-out
conversations and, with `--traces`, on real serving traces (examples/flywheel_ab.py --collect).

    python examples/corpus_pretrain.py --convs 400 --steps 2000 --out /tmp/day0
    aurora bench --systems ngram,online,online-ckpt --checkpoint /tmp/day0
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from aurora import Engine, EngineConfig, TrainerConfig
from aurora.flywheel.checkpoint import save_head
from aurora.flywheel.traces import TOP_K, TraceRecord
from aurora.flywheel.trainer import Trainer
from aurora.flywheel.vocab import VocabCounter, init_from_target
from aurora.models.eagle import build_head
from aurora.models.runner import ATTN_NAME, set_attn
from aurora.workloads.corpora import SHAREGPT_DOMAINS, iter_sharegpt_records, load_domain

HELD_CONVS = 20
ROLES = {"human": "user", "gpt": "assistant"}


def bench_prompts() -> set[str]:
    """First 200 characters of every prompt the bench and demo may draw (kept out of training)."""
    out = set()
    for seed in range(4):
        for d in SHAREGPT_DOMAINS:
            out |= {p.text[:200] for p in load_domain(d, 100, seed=seed)}
    return out


def conversations(tokenizer, skip: set[str], turns: int):
    """Chat-template text of ShareGPT conversations (first `turns` messages)."""
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
def distil(runner, ids: list[int]) -> TraceRecord:
    """One prefill of `ids` through the target (plain SDPA, no KV pool): a trace record whose
    every position has features and the target's top-k next-token distribution."""
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--convs", type=int, default=400, help="conversations distilled (the last 20 held out)")
    ap.add_argument("--max-len", type=int, default=512, help="tokens per conversation")
    ap.add_argument("--turns", type=int, default=4, help="messages per conversation")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--evals", type=int, default=8, help="held-out scores along the run")
    ap.add_argument("--traces", help="real serving traces to score on too (flywheel_ab.py --collect)")
    ap.add_argument("--out", help="save the trained head here (an eagle:<dir> checkpoint)")
    args = ap.parse_args()
    if args.convs <= HELD_CONVS:
        ap.error(f"--convs must exceed the {HELD_CONVS} held-out conversations")

    eng = Engine(EngineConfig(model=args.model, draft="none", online=False))
    runner, tok = eng.runner, eng.tokenizer
    t0, recs, skip = time.perf_counter(), [], bench_prompts()
    for text in conversations(tok, skip, args.turns):
        if len(recs) >= args.convs:
            break
        ids = tok(text, add_special_tokens=False)["input_ids"][:args.max_len]
        if len(ids) >= 32:
            recs.append(eng.run_on_worker(distil, runner, ids))
        if len(recs) % 50 == 0 and ids:
            print(f"distilled {len(recs)}/{args.convs} conversations ({time.perf_counter() - t0:.0f} s)", flush=True)
    positions = sum(len(r.features) for r in recs)
    report = {"convs": len(recs), "positions": positions, "distil_s": round(time.perf_counter() - t0, 1)}
    print(json.dumps(report), flush=True)
    held, train = recs[-HELD_CONVS:], recs[:-HELD_CONVS]
    real = []
    if args.traces:
        real = [TraceRecord(**d) for d in torch.load(args.traces, weights_only=False)]

    def run():
        cfg = TrainerConfig(lr=args.lr, max_passes=1e9, replay_records=len(train), holdout_every=0)
        counts = VocabCounter(runner.vocab_size)
        for r in train:
            counts.update(r.token_ids)
        head = build_head(runner, cfg.draft_vocab, cfg.seed)
        head.d2t.copy_(counts.top(head.draft_vocab, head.d2t))     # the corpus's most frequent tokens
        init_from_target(head, runner)
        tr = Trainer(head, runner, cfg)
        tr.add_records(train)
        sets = {"held": tr.eval_windows(held)} | ({"real": tr.eval_windows(real)} if real else {})
        curve, t1 = [], time.perf_counter()
        for step in range(args.steps + 1):
            if step % max(1, args.steps // args.evals) == 0 or step == args.steps:
                point = {"step": step, "rows": tr.tokens_trained, "s": round(time.perf_counter() - t1)}
                point |= {k: round(tr.evaluate(tr.head, w), 3) for k, w in sets.items()}
                curve.append(point)
                print(json.dumps(point), flush=True)
            if step < args.steps:
                tr.optimizer_step()
        return tr, curve

    tr, curve = eng.run_on_worker(run)
    report |= {"steps": tr.steps, "rows_trained": tr.tokens_trained, "curve": curve}
    if args.out:
        head = tr.head.to(runner.dtype).eval()
        save_head(head, args.out, {"feature_layers": list(runner.feature_layers), "version": 0,
                                   "trainer_steps": tr.steps, "source": "corpus_pretrain (ShareGPT)"})
        report["out"] = args.out
    eng.close()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
