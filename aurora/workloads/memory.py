"""Workloads where remembering earlier traffic pays, from the installed corpora.

* `multiturn`: ShareGPT conversations replayed turn by turn. Turn k's messages hold the earlier
  user turns and, as `None` placeholders, the assistant turns: a server's client sends back the
  model's own replies, so the runner fills them with the outputs it produced (`fill_history`).
* `templated`: one of a few task templates (summary, key points, entity extraction) over many
  different texts (ShareGPT replies), as chat requests.
* `related-code`: stdlib functions taken several at a time from the same module, in order.
"""
from __future__ import annotations

import random

from aurora.workloads.corpora import MEMORY_DOMAINS, Prompt, _is_text, iter_sharegpt_records, stdlib_snippets
SCAN_RECORDS = 4000                       # ShareGPT records scanned (streamed) for these workloads

TEMPLATES = (
    "Summarize the following text in two sentences.\n\nText:\n{text}",
    "List the key points of the following text as short bullet points.\n\nText:\n{text}",
    "Extract every named entity (people, organizations, places, products) from the text below and "
    "return them as a JSON list of strings.\n\nText:\n{text}",
)


def _turns(record: dict) -> list[tuple[str, str]]:
    out = []
    for turn in record.get("conversations") or ():
        if isinstance(turn, dict) and isinstance(turn.get("value"), str):
            role = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant"}.get(turn.get("from"))
            if role:
                out.append((role, turn["value"].strip()))
    return out


def multiturn(n: int, seed: int = 0, max_chars: int = 600, max_turns: int = 4) -> list[Prompt]:
    """`n` requests: whole conversations (2..max_turns user turns, each <= max_chars), turn by
    turn. `Prompt.messages` alternates user turns and assistant placeholders (content None)."""
    convs = []
    for rec in iter_sharegpt_records(SCAN_RECORDS):
        users = []
        for role, text in _turns(rec):
            if role == "user":
                if len(text) > max_chars or not _is_text(text):
                    break
                users.append(text)
        if len(users) >= 2:
            convs.append((str(rec.get("id", "")), users[:max_turns]))
    random.Random(f"multiturn:{seed}").shuffle(convs)
    out: list[Prompt] = []
    for cid, users in convs:
        messages: list[dict] = []
        for k, text in enumerate(users):
            if len(out) >= n:
                return out
            if k:
                messages.append({"role": "assistant", "content": None})
            messages.append({"role": "user", "content": text})
            out.append(Prompt(text, "multiturn", "sharegpt", messages=list(messages), ref=f"{cid}#{k}",
                              conversation=cid, turn=k))
    if len(out) < n:
        raise ValueError(f"only {len(out)} multi-turn requests in the first {SCAN_RECORDS} ShareGPT records")
    return out


def fill_history(prompt: Prompt, replies: dict[tuple[str, int], str]) -> list[dict]:
    """The prompt's messages with assistant placeholders replaced by `replies[(conversation,
    turn)]`, the text the serving system produced for that earlier turn ("" if it has none)."""
    out, turn = [], 0
    for m in prompt.messages or []:
        if m["role"] == "assistant" and m["content"] is None:
            out.append({"role": "assistant", "content": replies.get((prompt.conversation, turn), "")})
            turn += 1
        else:
            out.append(m)
    return out


def templated(n: int, seed: int = 0, max_chars: int = 1200, min_chars: int = 200) -> list[Prompt]:
    """`n` chat requests, each one of TEMPLATES over a different text (a ShareGPT reply of
    min_chars..max_chars characters)."""
    texts, seen = [], set()
    for rec in iter_sharegpt_records(SCAN_RECORDS):
        for role, text in _turns(rec):
            if role == "assistant" and min_chars <= len(text) <= max_chars and _is_text(text) and text not in seen:
                seen.add(text)
                texts.append((str(rec.get("id", "")), text))
                break
    if len(texts) < n:
        raise ValueError(f"only {len(texts)} texts for templated requests, asked for {n}")
    rng = random.Random(f"templated:{seed}")
    out = []
    for rid, text in rng.sample(texts, n):
        k = rng.randrange(len(TEMPLATES))
        body = TEMPLATES[k].format(text=text)
        out.append(Prompt(body, "templated", "sharegpt", messages=[{"role": "user", "content": body}],
                          ref=f"{rid}:t{k}"))
    return out


def related_code(n: int, seed: int = 0, per_file: int = 4, max_chars: int = 1500) -> list[Prompt]:
    """`n` stdlib function prompts, `per_file` consecutive ones from the same module (shared
    helpers, names and idioms: an earlier completion predicts a later one)."""
    out = stdlib_snippets(n, f"related:{seed}", per_file=per_file, max_chars=min(1500, max_chars))
    return [Prompt(p.text, "related-code", p.source, ref=p.ref) for p in out]


def load_memory_domain(domain: str, n: int, seed: int = 0, max_chars: int | None = None) -> list[Prompt]:
    if domain == "multiturn":
        return multiturn(n, seed, **({"max_chars": min(600, max_chars)} if max_chars else {}))
    if domain == "templated":
        return templated(n, seed, **({"max_chars": min(1200, max_chars)} if max_chars else {}))
    if domain == "related-code":
        return related_code(n, seed, **({"max_chars": max_chars} if max_chars else {}))
    raise ValueError(f"unknown memory workload {domain!r}; expected one of {MEMORY_DOMAINS}")
