"""A byte-level tokenizer for the tiny random presets: any text round-trips, no files.

Ids 0..2 are <pad>, <bos>, <eos>; byte b is id b + 3. It mirrors the slice of the
transformers tokenizer API the engine uses (encode, decode, chat template).
"""
from __future__ import annotations

OFFSET = 3


class ByteTokenizer:
    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    vocab_size = 256 + OFFSET
    chat_template = "byte"

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [b + OFFSET for b in text.encode("utf-8")]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        data = bytes(i - OFFSET for i in ids if OFFSET <= i < 256 + OFFSET)
        return data.decode("utf-8", errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = False, **_):
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        if add_generation_prompt:
            text += "<assistant>"
        return self.encode(text) if tokenize else text

    def __len__(self) -> int:
        return self.vocab_size
