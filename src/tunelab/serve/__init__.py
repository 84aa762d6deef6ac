"""`tunelab serve`: one frozen base model, many adapters, mixed-adapter batches, an OpenAI-compatible API.

- `service.build_service(...)` loads the base and adapters and starts the batching engine;
- `api.create_app(service)` is the FastAPI app; `server.serve(...)` runs it with uvicorn;
- `engine.Engine` batches requests of different adapters into one forward per decode step;
- `registry.AdapterRegistry` loads adapters by name from an adapter root, within rank and count limits.
"""

from tunelab.serve.engine import Engine, GenerationRequest, GenerationResult
from tunelab.serve.registry import AdapterRegistry
from tunelab.serve.server import running, serve
from tunelab.serve.service import Service, build_service

__all__ = ["AdapterRegistry", "Engine", "GenerationRequest", "GenerationResult", "Service", "build_service",
           "running", "serve"]
