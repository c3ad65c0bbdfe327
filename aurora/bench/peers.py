"""llama.cpp as a peer in `aurora bench`, through llama-cpp-python on the same GGUF file.

Same prompt token ids, same thread count, flash attention on, a fresh context per request
(no prefix reuse across requests, like Aurora). `llamacpp-ngram` adds the binding's prompt
lookup draft. llama-cpp-python builds llama.cpp from source (~10 min on 2 cores):
    pip install 'aurora-spec[peers]'      # or: pip install llama-cpp-python
Without it these systems are skipped with one line.
"""
from __future__ import annotations

import os
import time

from aurora.bench.systems import Output, System, Unavailable
from aurora.types import SamplingParams


class LlamaCppSystem(System):
    def __init__(self, name: str, spec, opts):
        try:
            import llama_cpp
        except ImportError as exc:
            raise Unavailable("llama-cpp-python is not installed: pip install 'aurora-spec[peers]' "
                              "(builds llama.cpp from source, ~10 min)") from exc
        from aurora.models.loader import _GGUF_MODELS, gguf_path
        if opts.model not in _GGUF_MODELS:
            raise Unavailable(f"llama.cpp needs a GGUF model ({', '.join(_GGUF_MODELS)}), not {opts.model!r}")
        self.name, self.label = name, spec.label
        threads = opts.threads or os.cpu_count() or 1
        kw = {"model_path": str(gguf_path(opts.model)), "n_ctx": min(opts.kv_tokens, 8192), "n_threads": threads,
              "n_threads_batch": threads, "flash_attn": True, "seed": opts.seed, "verbose": False}
        if spec.lookup:
            from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
            kw["draft_model"] = LlamaPromptLookupDecoding(num_pred_tokens=opts.lookup_tokens)
        self.llm = llama_cpp.Llama(**kw)
        self.eos = self.llm.token_eos()

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> Output:
        self.llm.reset()                                   # no KV reuse from the previous request
        if params.seed is not None:
            self.llm.set_seed(params.seed)
        if params.greedy:
            sampling = {"temp": 0.0, "top_k": 1}
        else:
            sampling = {"temp": params.temperature, "top_p": params.top_p, "top_k": params.top_k or 0, "min_p": 0.0}
        stop = set(params.stop_token_ids)
        out: list[int] = []
        reason = "length"
        t0 = time.perf_counter()
        for tok in self.llm.generate(list(prompt_ids), reset=True, repeat_penalty=1.0, **sampling):
            out.append(int(tok))
            if tok in stop or (not params.ignore_eos and tok == self.eos):
                reason = "stop"
                break
            if len(out) >= params.max_tokens:
                break
        return Output(out, time.perf_counter() - t0, None, None, None, reason)

    def close(self) -> None:
        self.llm = None
