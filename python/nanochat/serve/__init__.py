"""``nanochat.serve``: an OpenAI-compatible HTTP server with a built-in chat page.

```python
from nanochat.serve import EngineBackend, Settings, create_app

app = create_app(EngineBackend.from_path("model.gguf"), Settings(max_concurrent=4))  # any ASGI server runs it
```

From the shell: ``python -m nanochat.serve --model model.gguf`` (or ``nanochat-serve``); see
:mod:`nanochat.serve.cli`. Modules: ``app`` (the app factory, middlewares, generation plumbing), ``backend`` (the
protocol generation backends implement, the engine adapter, a fake for tests), ``schemas`` (OpenAI request and
response bodies), ``settings``, ``metrics`` (Prometheus), ``server`` (uvicorn with header/body timeouts and a
graceful SIGTERM), ``static/chat.html`` (the page served at ``/``).
"""

from nanochat.serve.app import create_app
from nanochat.serve.backend import Backend, Delta, EngineBackend, SamplingParams
from nanochat.serve.settings import Settings

__all__ = ["Backend", "Delta", "EngineBackend", "SamplingParams", "Settings", "create_app"]
