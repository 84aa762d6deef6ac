"""Selective checkpointing and offloaded checkpoint inputs: the same loss and gradients as no checkpointing."""

import copy

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from tunelab.config import RunConfig
from tunelab.train.activations import enable_gradient_checkpointing, offloaded_checkpoint


def _loss_and_grads(model, ids):
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("every,offload", [(1, False), (2, False), (1, True), (2, True)])
def test_checkpointed_llama_matches_the_plain_one(tiny_llama, every, offload, monkeypatch):
    import tunelab.train.activations as activations

    seen = []
    real = activations.checkpoint
    monkeypatch.setattr(activations, "checkpoint", lambda fn, *a, **k: seen.append(fn.__name__) or real(fn, *a, **k))
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    loss, grads = _loss_and_grads(tiny_llama, ids)
    ckpt = copy.deepcopy(tiny_llama)
    blocks = enable_gradient_checkpointing(ckpt, every=every, offload=offload)
    assert blocks == len(ckpt.model.layers[::every])
    ckpt_loss, ckpt_grads = _loss_and_grads(ckpt, ids)
    assert seen == (["run"] * blocks if offload else [])  # each chosen block parked its positional input
    assert torch.allclose(loss, ckpt_loss, atol=1e-6)
    assert grads.keys() == ckpt_grads.keys()
    for name, grad in grads.items():
        assert torch.allclose(grad, ckpt_grads[name], atol=1e-6), name


def test_offloaded_checkpoint_keeps_only_the_parked_copy_and_recomputes():
    weight = torch.randn(8, 8, requires_grad=True)
    calls = []

    def block(x):
        calls.append(x.data_ptr())
        return torch.tanh(x @ weight) + x

    x = torch.randn(4, 8, requires_grad=True)
    expected = block(x).sum()
    expected.backward()
    grad_x, grad_w = x.grad.clone(), weight.grad.clone()
    x.grad, weight.grad, calls[:] = None, None, []
    out = offloaded_checkpoint(block, x, use_reentrant=False).sum()
    assert torch.allclose(out, expected)
    assert calls and x.data_ptr() not in calls  # the block ran on a copy brought back from the parked one
    out.backward()
    assert len(calls) == 2  # the forward, then the recomputation in backward
    assert torch.allclose(x.grad, grad_x) and torch.allclose(weight.grad, grad_w)


def test_offloaded_checkpoint_without_a_positional_input_is_the_plain_checkpoint():
    x = torch.randn(3, requires_grad=True)
    out = offloaded_checkpoint(lambda: (x * 2).sum(), use_reentrant=False)
    assert torch.allclose(out, checkpoint(lambda: (x * 2).sum(), use_reentrant=False))


@pytest.mark.parametrize("key,value", [("offload_activations", True), ("checkpoint_every", 2)])
def test_checkpointing_options_need_checkpointing(key, value):
    with pytest.raises(ValueError, match=f"{key}: applies with gradient_checkpointing only"):
        RunConfig(**{key: value})
    assert getattr(RunConfig(gradient_checkpointing=True, **{key: value}), key) == value
