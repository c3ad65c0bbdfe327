"""Tiny random models built from configs in code, for fast tests of every code path.

Four families with different attention details: Llama (plain GQA), Qwen2 (biased q/k/v,
sliding-window layers), Qwen3 (QK-norm, sliding-window layers) and Gemma2 (softcapping, sliding
window, custom scaling).
Weights use a large init so logits are peaked and greedy argmax is numerically stable.
"""
from __future__ import annotations

import torch

from aurora.models.tokenizer import ByteTokenizer

VOCAB = ByteTokenizer.vocab_size + 5   # a few unused ids, like real vocabularies


def _llama():
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                       tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _qwen3():
    from transformers import Qwen3Config
    return Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                       max_position_embeddings=2048, use_sliding_window=True, sliding_window=24,
                       max_window_layers=2, tie_word_embeddings=False,
                       layer_types=["full_attention", "full_attention", "sliding_attention", "sliding_attention"],
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _qwen2():
    from transformers import Qwen2Config
    return Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                       use_sliding_window=True, sliding_window=24, max_window_layers=2, tie_word_embeddings=False,
                       layer_types=["full_attention", "full_attention", "sliding_attention", "sliding_attention"],
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _gemma2():
    from transformers import Gemma2Config
    return Gemma2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        max_position_embeddings=2048, sliding_window=20, query_pre_attn_scalar=16,
                        attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0)


PRESETS = {"tiny-llama": _llama, "tiny-qwen2": _qwen2, "tiny-qwen3": _qwen3, "tiny-gemma2": _gemma2}


def build(name: str, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Return (model, tokenizer) with deterministic random weights."""
    from transformers import AutoModelForCausalLM
    config = PRESETS[name]()
    config.initializer_range = 0.3
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    return model, ByteTokenizer()
