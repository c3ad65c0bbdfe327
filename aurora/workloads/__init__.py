"""Real traffic from installed corpora — no downloads at run time.

`corpora`: HumanEval, stdlib source and ShareGPT (code / finance / math / chat) as
`Prompt` records; `schedule`: domain-shift, mixed and tiny-prompt request streams;
`memory`: multi-turn replays, templated tasks and related code (memory of traffic pays).
"""
from aurora.workloads.corpora import (
    DEFAULT_MAX_CHARS,
    DOMAINS,
    MEMORY_DOMAINS,
    SHAREGPT_DOMAINS,
    CorpusUnavailable,
    Prompt,
    classify,
    humaneval_prompts,
    iter_json_array,
    iter_sharegpt_records,
    load_domain,
    sharegpt_prompts,
    sharegpt_subsets,
    stdlib_snippets,
)
from aurora.workloads.memory import fill_history, multiturn, related_code, templated
from aurora.workloads.schedule import (
    domain_shift,
    mixed,
    segments,
    switch_indices,
    tiny_prompts,
)

__all__ = [
    "DEFAULT_MAX_CHARS",
    "DOMAINS",
    "MEMORY_DOMAINS",
    "SHAREGPT_DOMAINS",
    "CorpusUnavailable",
    "Prompt",
    "classify",
    "domain_shift",
    "fill_history",
    "humaneval_prompts",
    "iter_json_array",
    "iter_sharegpt_records",
    "load_domain",
    "mixed",
    "multiturn",
    "related_code",
    "segments",
    "sharegpt_prompts",
    "sharegpt_subsets",
    "stdlib_snippets",
    "switch_indices",
    "templated",
    "tiny_prompts",
]
