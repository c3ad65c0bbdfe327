"""Incremental detokenisation: each step decodes only a short window of the newest tokens.

Re-decoding the whole output every step is O(L^2) over a request. Instead (as in vLLM) keep
two offsets into the output ids: text is final up to `read`, and decoding restarts at `prefix`
(the previous chunk, so merges and leading spaces come out as in a full decode). A chunk that
ends in U+FFFD is an incomplete UTF-8 character and waits for its next token.
"""
from __future__ import annotations

from aurora.engine.sequence import Sequence


def detokenize(tokenizer, seq: Sequence, final: bool = False) -> str:
    """Extend `seq.text` with the newly decodable text of its output ids; returns the text.
    `final`: flush everything, incomplete characters included."""
    start = seq.num_prompt
    end = len(seq.token_ids)
    if start + seq.detok_read >= end:
        return seq.text
    window = seq.token_ids[start + seq.detok_prefix:end]
    prefix_text = tokenizer.decode(window[:seq.detok_read - seq.detok_prefix], skip_special_tokens=True)
    new_text = tokenizer.decode(window, skip_special_tokens=True)
    if len(new_text) > len(prefix_text) and (final or not new_text.endswith("\ufffd")):
        seq.text += new_text[len(prefix_text):]
        seq.detok_prefix, seq.detok_read = seq.detok_read, end - start
    elif final:
        seq.detok_read = end - start
    return seq.text
