"""End-to-end load test of the real server on loopback: many concurrent streaming clients over many adapters,
against the same load on one adapter.

A Llama-shaped base (random weights from a config, `--shape` as in `serve_gpu.py`) and `--adapters` LoRA adapters
(r=16, all linear layers, random non-zero B) are written to a temporary directory; `build_service` serves them
with uvicorn on 127.0.0.1. `--clients` async clients (the official openai client's `AsyncOpenAI`, streaming
`/v1/completions` with `stream_options.include_usage`) each send requests back to back for `--seconds`: client i on adapter i mod `--adapters` (or all on one adapter),
`--prompt`-token prompts, `--new-tokens` tokens greedy with EOS ignored. The tokenizer has a word for every id of
the model's vocabulary, so every generated token streams as text. Reported per load: output tokens/s (every token
the engine generated within the window, from its `tunelab_generation_tokens_total` counter, over the window), time
to first token, the gaps between streamed chunks (ITL) and each finished request's time per output token after
the first (TPOT), p50 / p99, and the ratio of the two loads' throughputs.

    python bench/serve_load.py --out bench/results/serve_load_h200.json                     # on the GPU
    python bench/serve_load.py --shape tiny --adapters 4 --clients 8 --prompt 32 --new-tokens 8 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests"), str(ROOT / "bench")]


def write_model_and_adapters(workdir: Path, shape: str, adapters: int, rank: int) -> tuple[Path, Path]:
    """The base model dir (with a small local tokenizer) and an adapter root with adapters a0, a1, ..."""
    from serve_gpu import build_model

    from tunelab.artifacts import save_artifact
    from tunelab.methods import get_method

    base_dir, root = workdir / "base", workdir / "adapters"
    # built where it will be served, in its dtype: a 1B model's fp32 init on the host takes minutes
    cuda = torch.cuda.is_available()
    model = build_model(shape, "cuda" if cuda else "cpu", torch.bfloat16 if cuda else torch.float32)
    tokenizer = whole_vocab_tokenizer(base_dir, model.config.vocab_size)
    model.save_pretrained(base_dir)
    lora, gen = get_method("lora"), torch.Generator().manual_seed(2)
    for i in range(adapters):
        lora.inject(model, lora.Options(r=rank, alpha=2 * rank, target_modules="all-linear"), "default")
        with torch.no_grad():
            for key, p in lora.parameters(model, "default").items():
                if ".lora_B." in key:
                    p.copy_(torch.randn(p.shape, generator=gen).to(p) * 0.01)
        save_artifact(model, tokenizer, "default", root / f"a{i}")
        lora.remove(model, "default")
    return base_dir, root


def whole_vocab_tokenizer(path: Path, vocab_size: int):
    """A word-level tokenizer with one word per id of the model's vocabulary (`t2`, `t3`, ...; 0 and 1 are EOS and
    padding), saved at `path`: every token a random-weight model generates decodes to text, so every token is a
    streamed chunk and the client sees each one when the server sends it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "<pad>": 1} | {f"t{i}": i for i in range(2, vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>")
    fast.save_pretrained(path)
    return fast


def prompt_text(tokens: int, vocab_size: int) -> str:
    """A prompt of exactly `tokens` tokens of the word-level tokenizer (words of ids 2 to 1001 at most)."""
    return " ".join(f"t{2 + i % min(1000, vocab_size - 2)}" for i in range(tokens))


async def client(api, model: str, prompt: str, args, until: float, log: dict) -> None:
    """Send streaming completions through the openai client back to back until `until`; record time to first
    token, the gaps between streamed chunks, and each finished request's time per output token after the first
    ((last chunk - first chunk) / (tokens - 1), as vLLM's benchmark computes TPOT)."""
    while time.monotonic() < until:
        sent, first, last = time.monotonic(), None, None
        stream = await api.completions.create(model=model, prompt=prompt, max_tokens=args.new_tokens, temperature=0,
                                              stream=True, stream_options={"include_usage": True})
        async for chunk in stream:
            now = time.monotonic()
            if chunk.choices and chunk.choices[0].text:
                log["ttft" if last is None else "itl"].append(now - (sent if last is None else last))
                first, last = first or now, now
            if chunk.usage is not None and chunk.usage.completion_tokens > 1 and first is not None:
                log["tpot"].append((last - first) / (chunk.usage.completion_tokens - 1))


async def load(url: str, service, models: list[str], prompt: str, args) -> dict:
    """`--clients` clients for `--seconds`, client i on `models[i % len(models)]`, through one AsyncOpenAI."""
    import httpx2
    import openai

    log = {"ttft": [], "itl": [], "tpot": []}
    generated = service.engine.metrics.counters
    decoder = service.engine.decoder
    captures = decoder.captures if decoder is not None else 0
    http = openai.DefaultAsyncHttpxClient(limits=httpx2.Limits(max_connections=args.clients + 4))
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600,
                                  http_client=http) as api:
        start, before = time.monotonic(), generated["tunelab_generation_tokens_total"]
        until = start + args.seconds
        clients = [asyncio.create_task(client(api, models[i % len(models)], prompt, args, until, log))
                   for i in range(args.clients)]
        await asyncio.sleep(args.seconds)
        # every token the engine generated within the window, running requests' too (its step counter)
        tokens, wall = generated["tunelab_generation_tokens_total"] - before, time.monotonic() - start
        await asyncio.gather(*clients)

    def pct(xs, q):
        return round(statistics.quantiles(xs, n=100)[q - 1] * 1e3, 2) if len(xs) >= 2 else None
    return {"output_tokens_per_s": round(tokens / wall, 1), "requests_first_token": len(log["ttft"]),
            # CUDA graphs captured during this load (a capture stalls the batch it serves: a first-seen size)
            "graph_captures": (decoder.captures if decoder is not None else 0) - captures,
            "requests_finished": len(log["tpot"]),
            "ttft_ms_p50": pct(log["ttft"], 50), "ttft_ms_p99": pct(log["ttft"], 99),
            "itl_ms_p50": pct(log["itl"], 50), "itl_ms_p99": pct(log["itl"], 99),
            "tpot_ms_p50": pct(log["tpot"], 50), "tpot_ms_p99": pct(log["tpot"], 99)}


def phase(name: str, since: float) -> float:
    """Log a setup phase's wall time to stderr (a slow setup shows where it went) and return now."""
    now = time.monotonic()
    print(f"serve_load: {name} took {now - since:.1f} s", file=sys.stderr, flush=True)
    return now


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-1b")
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--stack-every", type=float, default=None,
                        help="dump every thread's stack to stderr this often (seconds): where a slow run waits")
    args = parser.parse_args(argv)
    if args.stack_every:
        import faulthandler

        faulthandler.dump_traceback_later(args.stack_every, repeat=True)
    from serve_gpu import environment

    from tunelab.serve.api import create_app
    from tunelab.serve.server import running
    from tunelab.serve.service import build_service

    with tempfile.TemporaryDirectory() as tmp:
        t = time.monotonic()
        base_dir, root = write_model_and_adapters(Path(tmp), args.shape, args.adapters, args.rank)
        t = phase("writing the model and adapters", t)
        service = build_service(base_dir, adapter_root=root, max_adapters=args.adapters, max_rank=args.rank,
                                max_batch_size=args.max_batch_size, max_tokens_limit=args.new_tokens,
                                dtype="bfloat16" if torch.cuda.is_available() else "auto")
        service.engine.eos_ids = set()  # every request generates exactly --new-tokens tokens
        t = phase("loading the service", t)
        prompt = prompt_text(args.prompt, len(service.tokenizer))
        names = [f"a{i}" for i in range(args.adapters)]
        loads = []
        for name in names:  # every adapter resident before the timed loads: a load is measured on its own
            start = time.monotonic()
            service.registry.release(service.registry.acquire(name))
            loads.append(time.monotonic() - start)
        t = phase(f"loading {len(names)} adapters (median {statistics.median(loads):.2f} s each)", t)
        try:
            with running(create_app(service)) as url:
                warm = argparse.Namespace(**{**vars(args), "seconds": 3})
                asyncio.run(load(url, service, names, prompt, warm))
                t = phase("starting the server and warming up", t)
                mixed = asyncio.run(load(url, service, names, prompt, args))
                one = asyncio.run(load(url, service, names[:1], prompt, args))
                phase("the two timed loads", t)
                metrics_text = service.engine.metrics.render()  # the server's own counters and histograms
        finally:
            service.close()
    result = {"command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
              "environment": environment("cuda" if torch.cuda.is_available() else "cpu"),
              "settings": vars(args) | {"out": str(args.out)}, "metrics": metrics_text.splitlines(),
              "adapter_load_seconds": {"median": round(statistics.median(loads), 3), "max": round(max(loads), 3)}, "mixed_adapters": mixed, "one_adapter": one,
              "mixed_over_one_throughput": round(mixed["output_tokens_per_s"] / max(one["output_tokens_per_s"], 1e-9),
                                                 3)}
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
