"""HTTP serving: an OpenAI-compatible aiohttp app around an embedded `Engine`.

app.py builds the app (middlewares, small routes); openai_api.py is the wire format;
generate.py drives completions; metrics.py is Prometheus; admin.py the speculator
route; state.py holds admission control; serve.py runs it (CLI process or a thread).
"""
from aurora.server.app import create_app
from aurora.server.serve import ServerThread, serve

__all__ = ["ServerThread", "create_app", "serve"]
