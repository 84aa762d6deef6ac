"""`--master-weights`: weights that train in bf16 are updated through fp32 copies, so small updates accumulate."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from builders import arithmetic_pairs, write_jsonl
from safetensors import safe_open

from tunelab.config import RunConfig
from tunelab.train import train
from tunelab.train.optim import MasterWeightAdamW


def _weights(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (0.02 + 0.01 * torch.rand(64, 64, generator=g)).to(torch.bfloat16)  # magnitudes of 0.02-0.03


def _steps(opt, p, grads):
    for g in grads:
        p.grad = g.clone()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("fused", [False, True])  # fused: the kernel a GPU run steps with (CPU has it too)
def test_small_updates_round_away_in_bf16_and_accumulate_through_the_master(fused):
    grads = [torch.randn(64, 64, generator=torch.Generator().manual_seed(i)).to(torch.bfloat16) for i in range(20)]
    plain = torch.nn.Parameter(_weights())
    _steps(torch.optim.AdamW([plain], lr=1e-5, weight_decay=0.0), plain, grads)
    assert torch.equal(plain.detach(), _weights())  # every update of 1e-5 fell under half a bf16 step

    p = torch.nn.Parameter(_weights())
    opt = MasterWeightAdamW([p], lr=1e-5, weight_decay=0.0, fused=fused)
    _steps(opt, p, grads)
    reference = torch.nn.Parameter(_weights().float())  # fp32 AdamW on the same (bf16-valued) gradients
    _steps(torch.optim.AdamW([reference], lr=1e-5, weight_decay=0.0, fused=fused), reference,
           [g.float() for g in grads])
    master = opt.state[p]["master"]
    assert master.dtype == torch.float32 and torch.equal(master, reference.detach())
    assert torch.equal(p.detach(), reference.detach().to(torch.bfloat16))  # the model holds the rounded master
    assert p.dtype == torch.bfloat16 and (p.detach() != _weights()).float().mean() > 0.2  # 27% here


def test_state_dict_round_trip_keeps_the_fp32_state():
    grads = [torch.randn(64, 64, generator=torch.Generator().manual_seed(i)).to(torch.bfloat16) for i in range(6)]
    a = torch.nn.Parameter(_weights())
    opt_a = MasterWeightAdamW([a], lr=1e-4)
    _steps(opt_a, a, grads[:3])
    saved = copy.deepcopy(opt_a.state_dict())  # as a checkpoint holds it (state_dict shares the live tensors)
    b = torch.nn.Parameter(a.detach().clone())
    opt_b = MasterWeightAdamW([b], lr=1e-4)
    opt_b.load_state_dict(saved)
    state = opt_b.state[b]
    assert {k: v.dtype for k, v in state.items() if k != "step"} == {
        "master": torch.float32, "exp_avg": torch.float32, "exp_avg_sq": torch.float32}
    assert b.dtype == torch.bfloat16
    _steps(opt_a, a, grads[3:])
    _steps(opt_b, b, grads[3:])
    assert torch.equal(a.detach(), b.detach())
    assert torch.equal(opt_a.state[a]["master"], opt_b.state[b]["master"])


def test_fp32_parameters_step_as_in_plain_adamw():
    w = torch.nn.Parameter(torch.ones(4))
    ref = torch.nn.Parameter(torch.ones(4))
    grads = [torch.full((4,), 0.5), torch.full((4,), -0.25)]
    opt = MasterWeightAdamW([w], lr=0.1)
    _steps(opt, w, grads)
    _steps(torch.optim.AdamW([ref], lr=0.1), ref, grads)
    assert torch.equal(w.detach(), ref.detach()) and "master" not in opt.state[w]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("master-data") / "pairs.jsonl", arithmetic_pairs(40))


def _cfg(tiny_dirs, pairs, out, **values) -> RunConfig:
    base = {"model": str(tiny_dirs["llama"]), "data": str(pairs), "output": str(out), "method": "full",
            "dtype": "bfloat16", "device": "cpu", "max_steps": 6, "batch_size": 4, "lr": 2e-5, "seed": 0,
            "schedule": "constant", "warmup_steps": 0, "val_fraction": 0.0}
    return RunConfig(**{**base, **values})


def _artifact(out) -> dict[str, torch.Tensor]:
    with safe_open(str(out / "artifact" / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_master_weights_are_on_by_default():
    assert RunConfig(model="m", data="d").master_weights
    from tunelab.measure.schema import CompareOptions

    assert CompareOptions.model_fields["master_weights"].default is True


def test_full_fine_tuning_of_a_bf16_model_moves_its_weights_only_with_master_weights(tiny_dirs, pairs, tmp_path):
    start = _artifact_of_base(tiny_dirs)
    train(_cfg(tiny_dirs, pairs, tmp_path / "plain", master_weights=False), progress=False)
    train(_cfg(tiny_dirs, pairs, tmp_path / "master", master_weights=True), progress=False)
    plain, master = _artifact(tmp_path / "plain"), _artifact(tmp_path / "master")
    assert all(t.dtype == torch.bfloat16 for t in master.values())  # the artifact keeps the model's dtype

    def moved(weights):
        return sum(int((weights[k].float() != start[k].float()).sum()) for k in start) / \
            sum(start[k].numel() for k in start)

    assert moved(master) > 2 * moved(plain) + 0.05  # lr 2e-5 rounds away in bf16, accumulates in fp32
    summary = json.loads((tmp_path / "master" / "run.json").read_text())
    assert summary["config"]["master_weights"] is True


def _artifact_of_base(tiny_dirs) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"], dtype=torch.bfloat16)
    return {k: v for k, v in model.state_dict().items()}


def test_resume_with_master_weights_is_exact(tiny_dirs, pairs, tmp_path):
    reference = tmp_path / "reference"
    train(_cfg(tiny_dirs, pairs, reference, master_weights=True), progress=False)
    out = tmp_path / "run"
    train(_cfg(tiny_dirs, pairs, out, master_weights=True, max_steps=3, save_every=3), progress=False)
    train(_cfg(tiny_dirs, pairs, out, master_weights=True, resume=True, force=True), progress=False)

    def losses(run):
        return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]

    assert losses(out) == losses(reference)
    a, b = _artifact(out), _artifact(reference)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_stepping_in_chunks_gives_the_same_update(monkeypatch):
    """The step runs over chunks of parameters (fp32 gradient copies of one chunk at a time): the same result."""
    grads = [torch.randn(64, 64, generator=torch.Generator().manual_seed(i)).to(torch.bfloat16) for i in range(4)]

    def run():
        ps = [torch.nn.Parameter(_weights(s)) for s in range(3)] + [torch.nn.Parameter(torch.ones(8))]
        opt = MasterWeightAdamW([{"params": ps[:2]}, {"params": ps[2:], "lr": 3e-4}], lr=1e-4)
        for g in grads:
            for p in ps:
                p.grad = g.clone() if p.dim() == 2 else torch.full((8,), 0.1)
            opt.step()
            opt.zero_grad()
        return [p.detach().clone() for p in ps], [opt.state[p].get("master") for p in ps]

    whole = run()
    monkeypatch.setattr(MasterWeightAdamW, "CHUNK_BYTES", 1)  # every parameter its own chunk
    chunked = run()
    assert all(torch.equal(a, b) for a, b in zip(whole[0], chunked[0]))
    assert all(torch.equal(a, b) for a, b in zip(whole[1][:3], chunked[1][:3]))
