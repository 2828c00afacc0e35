"""``nanochat.serve``: an OpenAI-compatible HTTP server (plus llama-server's /infill) with a built-in chat page.

```python
from nanochat.serve import EngineBackend, Settings, create_app

app = create_app(EngineBackend.from_path("model.gguf"), Settings(max_concurrent=4))  # any ASGI server runs it
```

From the shell: ``python -m nanochat.serve --model model.gguf`` (or ``nanochat-serve``); see
:mod:`nanochat.serve.cli`. Modules: ``app`` (the app factory and its OpenAPI spec), ``errors``, ``middleware``,
``generation`` (slots, worker threads, streaming, shutdown), ``routes`` (the endpoints), ``backend`` (the protocol
generation backends implement and its adapter over ``nanochat.engine``), ``schemas`` (request and response bodies),
``settings``, ``metrics`` (Prometheus), ``server`` (uvicorn with header/body timeouts and a graceful SIGTERM),
``static/chat.html`` (the page served at ``/``).

Names are re-exported lazily (:func:`nanochat.lazy_exports`), so ``nanochat-serve --help`` imports neither FastAPI
nor torch.
"""

from __future__ import annotations

from nanochat import lazy_exports

_EXPORTS = {
    "create_app": "app",
    **dict.fromkeys(["Backend", "Delta", "EngineBackend", "GenerationParams"], "backend"),
    "Settings": "settings",
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
