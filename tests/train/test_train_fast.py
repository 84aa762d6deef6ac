"""The speed switches' plain fallbacks: the fused loss equals the plain loss and its gradients; adapter inputs
under autocast; every switch off takes the old path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import build_tiny
from tunelab.methods import get_method, precision
from tunelab.methods.base import mark_trainable
from tunelab.train import fused_loss
from tunelab.train.loop import accumulate_window
from tunelab.train.loss import batch_loss_sum


@pytest.mark.parametrize("chunk", [1, 3, 64])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_cross_entropy_sum_equals_plain_with_gradients(chunk, with_bias):
    torch.manual_seed(1)
    hidden = torch.randn(11, 8, requires_grad=True)
    weight = torch.randn(13, 8, requires_grad=True)
    bias = torch.randn(13, requires_grad=True) if with_bias else None
    labels = torch.randint(0, 13, (11,))
    labels[[0, 4, 5]] = -100
    got = fused_loss.linear_cross_entropy_sum(hidden, weight, bias, labels, chunk=chunk)
    (got * 0.37).backward()  # backward scales the stored gradients by the incoming one
    fused_grads = [t.grad.clone() for t in (hidden, weight, bias) if t is not None]
    for t in (hidden, weight, bias):
        if t is not None:
            t.grad = None
    ref = F.cross_entropy(F.linear(hidden, weight, bias), labels, ignore_index=-100, reduction="sum")
    (ref * 0.37).backward()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-5)
    for g, t in zip(fused_grads, [t for t in (hidden, weight, bias) if t is not None]):
        torch.testing.assert_close(g, t.grad, rtol=1e-5, atol=1e-6)


def test_liger_loss_falls_back_to_the_chunked_loss_off_cuda():
    torch.manual_seed(2)
    hidden, weight, labels = torch.randn(6, 8), torch.randn(5, 8), torch.randint(0, 5, (6,))
    plain = F.cross_entropy(hidden @ weight.T, labels, reduction="sum")
    torch.testing.assert_close(fused_loss.linear_cross_entropy_sum(hidden, weight, None, labels, liger=True), plain)


def test_linear_cross_entropy_sum_without_grad_and_all_ignored():
    hidden, weight = torch.randn(4, 8), torch.randn(5, 8)
    labels = torch.full((4,), -100)
    assert float(fused_loss.linear_cross_entropy_sum(hidden, weight, None, labels, chunk=2)) == 0.0


def _batch(tokenizer):
    """Two texts right-padded by hand (calling the shared tokenizer with padding would change what it saves)."""
    rows = [tokenizer("the quick brown fox jumps")["input_ids"],
            tokenizer("hello, how are you today? i am fine")["input_ids"]]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :2] = -100  # a prompt part without loss
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _loss_and_grads(model, batch, fused):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)  # the same dropout masks on both paths (GPT-2 trains with dropout)
    loss, n = batch_loss_sum(model, batch, "causal-lm", fused=fused)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), n, grads


@pytest.mark.parametrize("kind", ["llama", "gpt2"])  # untied and tied output heads
@pytest.mark.parametrize("method,options", [("lora", {"r": 4, "alpha": 8}), ("full", {}),
                                            ("prompt", {"num_virtual_tokens": 3}), ("ia3", {})])
def test_fused_loss_equals_plain_loss_and_gradients(tokenizer, kind, method, options):
    model = build_tiny(kind, tokenizer)
    m = get_method(method)
    m.inject(model, m.Options(**options), "default")
    mark_trainable(model, m.parameters(model, "default"))
    if method == "lora":  # B starts at zero: move it so the adapter matters
        with torch.no_grad():
            for p in m.parameters(model, "default").values():
                p.add_(torch.randn_like(p) * 0.1)
    model.train()
    batch = _batch(tokenizer)
    assert fused_loss.fusable_head(model) is model.get_output_embeddings()
    plain, n_plain, g_plain = _loss_and_grads(model, batch, fused=False)
    fused, n_fused, g_fused = _loss_and_grads(model, batch, fused=True)
    assert n_plain == n_fused
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-5)
    assert g_plain.keys() == g_fused.keys() and g_plain
    for k in g_plain:
        torch.testing.assert_close(g_fused[k], g_plain[k], rtol=1e-5, atol=1e-6, msg=k)
    assert model.get_output_embeddings().forward.__func__ is type(model.get_output_embeddings()).forward


def test_fused_loss_keeps_the_plain_path_where_it_cannot_apply(tokenizer, monkeypatch):
    model = build_tiny("llama", tokenizer)
    model.config.final_logit_softcapping = 30.0  # logits are not head(hidden): plain path
    assert fused_loss.fusable_head(model) is None
    model.config.final_logit_softcapping = None
    handle = model.get_output_embeddings().register_forward_hook(lambda *a: None)
    assert fused_loss.fusable_head(model) is None  # something else watches the head's output
    handle.remove()
    assert fused_loss.fusable_head(model) is not None
    head = model.get_output_embeddings()
    head.forward = lambda x: x  # a forward of its own (as an NF4-quantised head has)
    assert fused_loss.fusable_head(model) is None
    del head.forward
    assert fused_loss.fusable_head(model) is head


def test_switches_off_take_the_old_path(tokenizer, monkeypatch):
    """fused=False never touches the fused loss; cast_inputs(True) casts adapter inputs even under autocast."""
    model = build_tiny("llama", tokenizer)
    monkeypatch.setattr(fused_loss, "fusable_head", lambda m: pytest.fail("fused loss used with the switch off"))
    accumulate_window(model, [_batch(tokenizer)], "causal-lm", fused=False)
    x = torch.randn(2, 3, 4, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert precision.adapter_input(x, torch.float32) is x
        with precision.cast_inputs(True):
            assert precision.adapter_input(x, torch.float32).dtype == torch.float32
    assert precision.adapter_input(x, torch.float32).dtype == torch.float32  # no autocast: the plain rule


@pytest.mark.parametrize("method", ["lora", "dora", "adapter", "ia3"])
def test_adapter_dtype_switch_leaves_fp32_results_identical(tokenizer, method):
    """Without autocast (CPU fp32) the switch changes nothing, bit for bit; under autocast both agree closely."""
    model = build_tiny("llama", tokenizer)
    m = get_method(method)
    m.inject(model, m.Options(), "default")
    with torch.no_grad():
        for p in m.parameters(model, "default").values():
            p.add_(torch.randn_like(p) * 0.05)
    batch = _batch(tokenizer)

    def logits(cast, autocast=False):
        with precision.cast_inputs(cast), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()

    assert torch.equal(logits(False), logits(True))
    torch.testing.assert_close(logits(False, True), logits(True, True), rtol=0.05, atol=0.05)
