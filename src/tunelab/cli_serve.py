"""The serving commands of the `tunelab` CLI: `serve` (the OpenAI-compatible server), and `generate` / `chat`,
which try a model or an adapter in the terminal through the same engine, with no server.

`tunelab.cli` registers them. As there, tunelab's layers are imported inside the commands, so `--help` and usage
errors answer without loading torch.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from tunelab.errors import ConfigError

Dtype = Annotated[Optional[str], typer.Option(help="auto (bfloat16 on a GPU that has it, else float32), float32, "
                                                   "bfloat16, float16.")]
Device = Annotated[Optional[str], typer.Option(help="auto (CUDA when present), cpu, cuda, cuda:N.")]
ChatTemplate = Annotated[Optional[str], typer.Option(help="Chat template for a base without one: a Jinja file, "
                                                          "or chatml / alpaca.")]


def serve(
    config: Annotated[Optional[Path], typer.Option("--config", help="YAML serve config; flags override it.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Base model dir or alias (loaded once, frozen).")] = None,
    adapter: Annotated[Optional[list[str]], typer.Option(help="NAME=DIR of an adapter to load (repeatable).")] = None,
    host: Annotated[Optional[str], typer.Option(help="Address to listen on [127.0.0.1].")] = None,
    port: Annotated[Optional[int], typer.Option(min=1, max=65535, help="Port to listen on [8000].")] = None,
    adapter_root: Annotated[Optional[Path], typer.Option(help="Dir of adapters loaded on demand by name.")] = None,
    max_adapters: Annotated[Optional[int], typer.Option(min=1, help="Most adapters held at once (LRU eviction of "
                                                                    "idle ones) [8].")] = None,
    max_rank: Annotated[Optional[int], typer.Option(min=1, help="Refuse adapters of a higher rank [64].")] = None,
    max_batch_size: Annotated[Optional[int], typer.Option(min=1, help="Most sequences decoded together [16].")] = None,
    max_tokens_limit: Annotated[Optional[int], typer.Option(min=1, help="Largest max_tokens a request may ask "
                                                                        "for [512].")] = None,
    prefill_chunk: Annotated[Optional[int], typer.Option(min=1, help="Prompt tokens (over the joining rows) "
                                                                     "prefilled between two decode steps of a running "
                                                                     "batch [2048].")] = None,
    cuda_graphs: Annotated[Optional[bool], typer.Option("--cuda-graphs/--no-cuda-graphs", help="Replay decode "
                                                        "steps as CUDA graphs on a GPU [on].")] = None,
    slot_wait: Annotated[Optional[float], typer.Option(min=0, help="Seconds a request for a non-resident adapter "
                                                                   "waits for a free slot before a 503 [30].")] = None,
    merge: Annotated[Optional[str], typer.Option(help="Fold this adapter into the base at start.")] = None,
    served_model_name: Annotated[Optional[str], typer.Option(help="Name of the base model in requests and "
                                                                  "/v1/models [its alias or dir name].")] = None,
    dtype: Dtype = None,
    device: Device = None,
    chat_template: ChatTemplate = None,
    api_key: Annotated[Optional[str], typer.Option(envvar="TUNELAB_API_KEY", show_envvar=True,
                                                   help="Require 'Authorization: Bearer KEY' on /v1 routes.")] = None,
    docs: Annotated[Optional[bool], typer.Option("--docs/--no-docs", help="Serve /docs, /redoc and "
                                                                          "/openapi.json.")] = None,
) -> None:
    """Serve one frozen base with many adapters (mixed-adapter batches) behind an OpenAI-compatible API."""
    from tunelab.config import load_yaml
    from tunelab.serve.settings import build_serve_config, parse_adapter_pairs

    file_values = load_yaml(config) if config else {}
    flags = dict(model=model, adapters=parse_adapter_pairs(adapter), host=host, port=port,
                 adapter_root=adapter_root, max_adapters=max_adapters, max_rank=max_rank,
                 max_batch_size=max_batch_size, max_tokens_limit=max_tokens_limit, prefill_chunk=prefill_chunk,
                 cuda_graphs=cuda_graphs, slot_wait=slot_wait, merge=merge,
                 served_model_name=served_model_name, dtype=dtype, device=device, chat_template=chat_template,
                 api_key=api_key, docs=docs)
    cfg = build_serve_config(file_values, flags, where=str(config) if config else "serve")
    from tunelab.artifacts import check_adapter_dir
    from tunelab.serve.server import serve as run_server

    adapters = {name: check_adapter_dir(path) for name, path in cfg.adapters.items()}
    _check_listen_address(cfg.host, cfg.port)
    run_server(cfg.model, adapters, host=cfg.host, port=cfg.port, adapter_root=cfg.adapter_root,
               max_adapters=cfg.max_adapters, max_rank=cfg.max_rank, max_batch_size=cfg.max_batch_size,
               max_tokens_limit=cfg.max_tokens_limit, prefill_chunk=cfg.prefill_chunk,
               cuda_graphs=cfg.cuda_graphs, merge=cfg.merge, api_key=cfg.api_key, docs=cfg.docs,
               served_model_name=cfg.served_model_name, dtype=cfg.dtype, device=cfg.device,
               slot_wait_s=cfg.slot_wait, chat_template=cfg.chat_template)


def _check_listen_address(host: str, port: int) -> None:
    """`--host` must name an address of this machine's resolver, checked before the model loads."""
    import socket

    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise ConfigError(f"--host {host!r}: not an address to listen on ({e.strerror or e})") from None


Model = Annotated[str, typer.Option(help="Base model dir or alias.")]
Adapter = Annotated[Optional[Path], typer.Option(help="Adapter dir to apply (PEFT layout).")]
MaxTokens = Annotated[int, typer.Option(min=1, help="Most tokens to generate per answer.")]
Temperature = Annotated[float, typer.Option(min=0, help="0 is greedy; higher samples more freely.")]
TopP = Annotated[float, typer.Option(min=0, max=1, help="Nucleus sampling: the smallest set of tokens holding this "
                                                       "much probability.")]
Seed = Annotated[Optional[int], typer.Option(help="Seed of the sampling, for the same answer twice.")]
Stop = Annotated[Optional[list[str]], typer.Option(help="Stop the answer at this text (repeatable).")]


def generate(
    model: Model,
    prompt: Annotated[Optional[str], typer.Option(help="The prompt; read from stdin when not given.")] = None,
    adapter: Adapter = None,
    max_tokens: MaxTokens = 64,
    temperature: Temperature = 0.0,
    top_p: TopP = 1.0,
    seed: Seed = None,
    stop: Stop = None,
    dtype: Dtype = None,
    device: Device = None,
) -> None:
    """Complete one prompt with a model or an adapter (no server), printing the text as it comes."""
    text = prompt if prompt is not None else sys.stdin.read()
    with _session(model, adapter, dtype, device, None) as session:
        session.answer(session.service.encode_prompt(text), max_tokens, temperature, top_p, seed, stop)


def chat(
    model: Model,
    adapter: Adapter = None,
    system: Annotated[Optional[str], typer.Option(help="A system message opening the conversation.")] = None,
    max_tokens: MaxTokens = 256,
    temperature: Temperature = 0.7,
    top_p: TopP = 1.0,
    seed: Seed = None,
    stop: Stop = None,
    dtype: Dtype = None,
    device: Device = None,
    chat_template: ChatTemplate = None,
) -> None:
    """Chat with a model or an adapter (no server): each line on stdin is a user turn; an empty line or end of
    input ends the chat. Answers print as they come."""
    messages = [{"role": "system", "content": system}] if system else []
    with _session(model, adapter, dtype, device, chat_template) as session:
        while True:
            if sys.stdin.isatty():
                print("> ", end="", flush=True)
            line = sys.stdin.readline()
            if not line.strip():
                return
            messages.append({"role": "user", "content": line.rstrip("\n")})
            ids = session.service.encode_chat(messages)
            room = (session.service.engine.context_length or len(ids) + max_tokens) - len(ids)
            reply = session.answer(ids, min(max_tokens, room), temperature, top_p, seed, stop)
            messages.append({"role": "assistant", "content": reply})


class _Session:
    """A started service and the public name requests give (the adapter's, or the base's)."""

    def __init__(self, service, name: str):
        self.service, self.name = service, name

    def answer(self, ids: list[int], max_tokens: int, temperature: float, top_p: float, seed: int | None,
               stop: list[str] | None) -> str:
        """Generate for prompt `ids`, printing text as it becomes final; the whole answer."""
        from tunelab.serve.request import GenerationRequest

        req = GenerationRequest(ids, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                stop=list(stop or []), on_text=lambda text: print(text, end="", flush=True))
        result = self.service.submit(self.name, req).result()
        print(flush=True)
        return result.text

    def __enter__(self) -> _Session:
        return self

    def __exit__(self, *exc) -> None:
        self.service.close()


def _session(model: str, adapter: Path | None, dtype: str | None, device: str | None,
             chat_template: str | None) -> _Session:
    """Load `model` (and `adapter`) into a serving engine, as `tunelab serve` would, with no HTTP server."""
    from tunelab.artifacts import check_adapter_dir
    from tunelab.serve.service import build_service

    adapters = {"adapter": check_adapter_dir(adapter)} if adapter is not None else {}
    service = build_service(model, adapters, dtype=dtype or "auto", device=device or "auto",
                            max_tokens_limit=2**31 - 1, chat_template=chat_template)
    return _Session(service, "adapter" if adapter is not None else service.base_name)
