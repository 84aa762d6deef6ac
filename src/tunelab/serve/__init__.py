"""`tunelab serve`: one frozen base model, many adapters, mixed-adapter batches, an OpenAI-compatible API.

- `service.build_service(...)` loads the base and adapters and starts the batching engine;
- `api.create_app(service)` is the FastAPI app; `server.serve(...)` runs it with uvicorn;
- `engine.Engine` batches requests of different adapters into one forward per decode step;
- `registry.AdapterRegistry` loads adapters by name from an adapter root, within rank and count limits.
"""


import importlib

# name -> its module; imported on first use, so the engine runs where the HTTP stack (fastapi, uvicorn) is absent
_WHERE = {"AdapterRegistry": "registry", "Engine": "engine", "GenerationRequest": "engine",
          "GenerationResult": "engine", "Service": "service", "build_service": "service", "running": "server",
          "serve": "server"}
__all__ = ["AdapterRegistry", "Engine", "GenerationRequest", "GenerationResult", "Service", "build_service",
           "running", "serve"]


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'tunelab.serve' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
