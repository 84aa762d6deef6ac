"""A qlora artifact on a shared base: served as the plain LoRA it saved, the base never quantised."""

from __future__ import annotations

import pytest
import torch
from serve.helpers import (  # noqa: F401  (fixtures)
    PROMPTS, adapter_root, base_dir, make_adapter, make_service, one_thread, reference_greedy,
)

from tunelab.artifacts import inspect
from tunelab.methods import nf4
from tunelab.methods.base import adapter_state
from tunelab.serve.engine import GenerationRequest


@pytest.fixture(scope="module")
def qlora_dir(tmp_path_factory, base_dir, tokenizer):
    pytest.importorskip("torchao")
    return make_adapter(base_dir, tokenizer, tmp_path_factory.mktemp("q") / "q", method="qlora", seed=7, r=4)


def _greedy(service, name, prompt, n=6):
    req = GenerationRequest(service.tokenizer(prompt).input_ids, max_tokens=n, temperature=0)
    return service.submit(name, req).result(timeout=60).token_ids


def test_qlora_artifact_is_served_as_lora_without_quantising_the_shared_base(make_service, adapter_root,
                                                                             base_dir, qlora_dir, tokenizer):
    info = inspect(qlora_dir)
    assert (info.method, info.files_method, info.kind, info.rank) == ("qlora", "lora", "adapter", 4)
    service = make_service({"a": adapter_root / "a"})
    service.engine.eos_ids = set()
    model = service.engine.model
    base_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    a_before = {p: _greedy(service, "a", p) for p in PROMPTS[:3]}
    ids = torch.tensor([tokenizer(PROMPTS[1]).input_ids])
    key_a = service.registry.acquire("a")
    with torch.inference_mode():
        adapter_state(model).active = (key_a,)
        logits_a = model(ids).logits.clone()
        adapter_state(model).active = ()
    service.registry.release(key_a)

    service.registry.add("q", qlora_dir)
    record = next(a for a in service.registry.loaded() if a.name == "q")
    assert (record.method, record.served_as) == ("qlora", "lora")  # recorded truthfully
    assert adapter_state(model).methods[record.key] == "lora"
    assert not any(nf4.is_quantized(m) for m in model.modules())  # the shared base stays as it was
    for n, p in base_before.items():
        assert torch.equal(dict(model.named_parameters())[n], p), n

    # the other adapter's outputs are unchanged, alone and in a batch beside q
    assert {p: _greedy(service, "a", p) for p in PROMPTS[:3]} == a_before
    key_a = service.registry.acquire("a")
    with torch.inference_mode():
        adapter_state(model).active = (key_a,)
        assert torch.equal(model(ids).logits, logits_a)
        adapter_state(model).active = ()
    service.registry.release(key_a)
    # q gives what its LoRA gives on the unquantised base (HF PEFT's reading of the artifact)
    prompt_ids = [tokenizer(p).input_ids for p in PROMPTS[:2]]
    expected = reference_greedy(base_dir, qlora_dir, prompt_ids, 6, as_method="lora")
    assert [_greedy(service, "q", p) for p in PROMPTS[:2]] == expected
