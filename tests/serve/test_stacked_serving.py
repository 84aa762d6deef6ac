"""Which path the engine takes: mixed batches and one-adapter prefills through `row_adapters` (the stacked
path), one-adapter decode steps through the active adapter; the outputs are the same either way."""

from __future__ import annotations

from serve.helpers import PROMPTS, adapter_root, base_dir, make_service  # noqa: F401  (fixtures)

from tunelab.methods.base import adapter_state
from tunelab.serve.engine import GenerationRequest


def _generate(service, tokenizer, key, n=4):
    seen = []
    model = service.engine.model
    handle = model.register_forward_pre_hook(
        lambda m, a: seen.append((adapter_state(m).row_adapters, adapter_state(m).active)))
    try:
        requests = [GenerationRequest(tokenizer(p).input_ids, adapter=key, max_tokens=n, temperature=0)
                    for p in PROMPTS[:2]]
        return [r.token_ids for r in service.engine.generate(requests)], seen
    finally:
        handle.remove()


def test_one_adapter_takes_the_stacked_path_in_prefill_and_decode(make_service, adapter_root, tokenizer):
    service = make_service({"a": adapter_root / "a"})
    service.engine.eos_ids = set()
    key = service.registry.acquire("a")
    tokens, seen = _generate(service, tokenizer, key)
    assert seen[0] == ([key, key], (key,))  # prefill: the stacked path
    assert all(rows == [key, key] and active == (key,) for rows, active in seen[1:])  # decode steps too
    for phases in ({"prefill"}, set()):  # decode on the active path, or every step: the same tokens
        service.engine.stack_one_adapter = phases
        again, seen = _generate(service, tokenizer, key)
        assert again == tokens
        assert all((rows is not None) == ("decode" in phases) for rows, _ in seen[1:])
