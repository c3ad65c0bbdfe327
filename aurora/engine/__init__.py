"""The serving engine: scheduling, KV cache, draft trees, verification, sampling."""
