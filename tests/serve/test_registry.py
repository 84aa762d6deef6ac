"""The adapter registry: names, LRU eviction of idle adapters, reference counts, clean unloading."""

from __future__ import annotations

import threading

import pytest
import torch
from serve.helpers import PROMPTS, adapter_root, base_dir, make_service, one_thread  # noqa: F401  (fixtures)

from tunelab.errors import TunelabError
from tunelab.methods.base import adapter_state
from tunelab.serve.engine import GenerationRequest
from tunelab.serve.errors import AdapterRejected, Busy, ModelNotFound
from tunelab.serve.registry import check_name


@pytest.mark.parametrize("name", ["a", "org/adapter-1", "v1.2_final"])
def test_plain_relative_names_pass(name):
    check_name(name)


@pytest.mark.parametrize("name, words", [
    ("../a", "'..'"), ("a/../../b", "'..'"), ("/etc/passwd", "absolute"), ("\\\\host\\share", "absolute"),
    ("C:\\x", "absolute"), ("a\\..\\b", "'\\'"), ("", "absolute"), (".hidden", "part '.hidden'"),
    ("a//b", "part ''"), ("a b", "part 'a b'"), ("x\x00", "part"),
    ("a/" * 5000 + "a", "adapter name of 10001 characters: expected at most 256"),  # no ENAMETOOLONG from the OS
])
def test_unsafe_names_are_rejected(name, words):
    with pytest.raises(AdapterRejected) as err:
        check_name(name)
    assert words in str(err.value) and "\n" not in str(err.value)


def _greedy(service, name, prompt=PROMPTS[0], n=6):
    req = GenerationRequest(service.tokenizer(prompt).input_ids, max_tokens=n, temperature=0)
    return service.submit(name, req).result(timeout=60).token_ids


def test_least_recently_used_idle_adapter_is_evicted(make_service, adapter_root):
    service = make_service(adapter_root=adapter_root, max_adapters=2)
    service.engine.eos_ids = set()
    first = {n: _greedy(service, n) for n in "ab"}
    _greedy(service, "a")  # a is now the most recently used
    _greedy(service, "c")  # one too many: b goes
    assert [a.name for a in service.registry.loaded()] == ["c", "a"]
    assert len(adapter_state(service.engine.model).methods) == 2
    assert _greedy(service, "b") == first["b"]  # reloaded from its directory, same weights
    assert [a.name for a in service.registry.loaded()] == ["b", "c"]


def test_all_adapters_held_means_busy(make_service, adapter_root):
    service = make_service(adapter_root=adapter_root, max_adapters=1, slot_wait_s=0)  # no wait for a slot
    key = service.registry.acquire("a")
    with pytest.raises(Busy) as err:
        service.registry.acquire("b")
    assert "--max-adapters" in str(err.value) and err.value.status == 503
    service.registry.release(key)
    service.registry.release(service.registry.acquire("b"))  # a was idle again: evicted
    assert [a.name for a in service.registry.loaded()] == ["b"]


def test_unloading_leaves_the_base_as_it_was(make_service, adapter_root, base_dir):
    from transformers import AutoModelForCausalLM

    service = make_service(adapter_root=adapter_root, max_adapters=1)
    model = service.engine.model
    names_before = {n for n, _ in model.named_parameters()}
    for name in "abcd":
        service.registry.release(service.registry.acquire(name))
    service.registry.release(service.registry.acquire("soft"))
    state = adapter_state(model)
    assert len(state.methods) == 1 and state.active == () and state.row_adapters is None
    fresh = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    ids = torch.tensor([service.tokenizer(PROMPTS[1]).input_ids])
    service.registry.unload("soft")  # the last one goes too
    assert adapter_state(model).methods == {} and service.registry.loaded() == []
    assert {n for n, _ in model.named_parameters()} == names_before
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, fresh(ids).logits)


def test_concurrent_first_requests_load_an_adapter_once(make_service, adapter_root):
    service = make_service(adapter_root=adapter_root)
    keys, errors = [], []

    def take():
        try:
            keys.append(service.registry.acquire("c"))
        except TunelabError as e:
            errors.append(e)

    threads = [threading.Thread(target=take) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and len(set(keys)) == 1 and len(keys) == 6
    assert service.registry.loaded()[0].refs == 6


def test_start_adapters_are_checked(make_service, adapter_root, base_dir, tmp_path):
    from tunelab.errors import ConfigError

    with pytest.raises(ModelNotFound, match="'x'.*not a directory"):
        make_service({"x": tmp_path / "missing"})
    with pytest.raises(AdapterRejected, match="base model's name"):
        make_service({base_dir.name: adapter_root / "a"})
    with pytest.raises(ConfigError, match="--max-adapters 1: 2 adapters"):
        make_service({"a": adapter_root / "a", "b": adapter_root / "b"}, max_adapters=1)
    with pytest.raises(ConfigError, match="--merge soft: method 'prompt' cannot be merged"):
        make_service({"soft": adapter_root / "soft"}, merge="soft")
    with pytest.raises(ConfigError, match="--merge a: expected exactly one --adapter"):
        make_service({"a": adapter_root / "a", "b": adapter_root / "b"}, merge="a")


def test_the_mixed_batch_probe_accepts_a_small_lora_in_bfloat16(tokenizer):
    """Rounding of a bf16 batched forward must not make a small adapter look like one that ignores its rows."""
    from conftest import build_tiny

    from tunelab.methods import get_method
    from tunelab.serve.adapter_files import mixed_batch_ok

    model = build_tiny("llama", tokenizer).to(torch.bfloat16).eval()
    lora = get_method("lora")
    lora.inject(model, lora.Options(r=4, target_modules="all-linear"), "a")
    with torch.no_grad():
        for key, p in lora.parameters(model, "a").items():
            if ".lora_B." in key:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.01)
    assert mixed_batch_ok(model.requires_grad_(False), "lora", "a")


def test_the_mixed_batch_check_tolerates_rounding_spikes_but_not_a_row_given_the_wrong_adapter():
    """One logit off by 10% of the adapter's largest change (bf16 rounding of a batched forward) passes; a row that
    got the other row's adapter (a method ignoring row_adapters) does not. A largest-entry test refused the first."""
    from tunelab.serve.adapter_files import rows_match

    gen = torch.Generator().manual_seed(0)
    base = torch.randn(6, 50, generator=gen)
    alone = base + 0.1 * torch.randn(6, 50, generator=gen)
    spike = torch.zeros(6, 50)
    spike[2, 7] = 0.1 * float((alone - base).abs().max())
    assert rows_match(torch.stack([alone + spike, base - spike]), alone, base)
    assert not rows_match(torch.stack([alone, alone]), alone, base)  # row 1 got the adapter too
    assert not rows_match(torch.stack([base, base]), alone, base)  # row 0 did not get it


def test_a_root_of_a_thousand_adapters_is_served_through_a_few_slots(make_service, adapter_root, tmp_path):
    """Adapters are found by name on disk, at most `max_adapters` are on the model,
    and the least recently used idle one makes room: loads and evictions are counted in the metrics."""
    import random
    import shutil

    root = tmp_path / "many"
    for i in range(1000):
        shutil.copytree(adapter_root / ("a" if i % 2 == 0 else "b"), root / f"team{i // 100}" / f"task-{i:04d}")
    service = make_service(adapter_root=root, max_adapters=4)
    service.engine.eos_ids = set()
    want = {"a": _greedy(service, "team0/task-0000"), "b": _greedy(service, "team0/task-0001")}
    asked = ["team0/task-0000", "team0/task-0001"] + \
        [f"team{i // 100}/task-{i:04d}" for i in random.Random(0).sample(range(2, 1000), 30)]
    for name in asked[2:]:
        assert _greedy(service, name) == want["a" if int(name[-4:]) % 2 == 0 else "b"], name
    for name in asked[-3:]:  # still on the model: no load
        _greedy(service, name)
    loaded = [a.name for a in service.registry.loaded()]
    assert len(loaded) == 4 and set(loaded) == set(asked[-4:])
    got = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
           for line in service.engine.metrics.render().splitlines() if line and not line.startswith("#")}
    assert got["tunelab_adapter_loads_total"] == len(asked) and got["tunelab_adapter_evictions_total"] == len(asked) - 4
    assert len(adapter_state(service.engine.model).methods) == 4
