"""Aurora: an online speculative-decoding engine whose draft learns from live traffic.

Public surface: `Engine`, `EngineConfig`, `SamplingParams`, `RequestOutput`.
"""
import os as _os

# Never reach a model hub at run time: weights come from packages or local paths.
_os.environ.setdefault("HF_HUB_OFFLINE", "1")
_os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from aurora.config import EngineConfig, SpecConfig, TrainerConfig, ServerConfig  # noqa: E402
from aurora.types import SamplingParams, RequestOutput  # noqa: E402


def __getattr__(name):  # lazy: importing the engine pulls in torch + transformers
    if name == "Engine":
        from aurora.engine.engine import Engine
        return Engine
    raise AttributeError(name)


__all__ = ["Engine", "EngineConfig", "SpecConfig", "TrainerConfig", "ServerConfig",
           "SamplingParams", "RequestOutput"]
__version__ = "0.1.0"
