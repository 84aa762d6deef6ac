"""Training on 2 processes (torchrun, gloo, CPU) through the one loop: the same losses as one process with the
same global batch, FSDP2 and DDP; the artifact in the one-process format; kill -9 of a rank and an exact resume;
bad input on one rank stops both with one line, within a bounded time.

The pinned CPU torch runs FSDP2 (`fully_shard`) on gloo, so both strategies are tested here."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from builders import arithmetic_pairs, write_jsonl

from tunelab.config import RunConfig
from tunelab.train import train

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
LIMIT = 150  # seconds: any launch that takes longer hangs (the tests' bound on "no hang")
CASES = {"lora-fsdp": ("lora", "fsdp"), "full-fsdp": ("full", "fsdp"), "lora-ddp": ("lora", "ddp")}
# bf16 weights with fp32 masters: FSDP2 holds them in fp32 shards, one process in MasterWeightAdamW's state
MASTER = {"full-fsdp-master": ("full", "fsdp"), "full-ddp-master": ("full", "ddp")}
MASTER_SETTINGS = {"dtype": "bfloat16", "master_weights": True}
# FSDP2 blocks that keep their gathered weights from the forward to the backward (auto's choice on a large GPU)
KEEP = {"full-fsdp-keep": ("full", "fsdp")}


def env(**extra) -> dict:
    out = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT / "src")}
    out.pop("TUNELAB_TEST_FAIL_RANK", None)
    return out | extra


def config(tiny_dirs, data: Path, out: Path, method: str, strategy: str = "auto") -> dict:
    """6 steps, windows of 6 examples in micro-batches of 2 (3 per window on 1 process, 2 and 1 on 2 ranks:
    rank 1 runs a padding micro-batch), a checkpoint every 2 steps, no dropout (draws differ per rank)."""
    options = {"r": 4, "dropout": 0.0, "target_modules": "all-linear"} if method == "lora" else {}
    return {"model": str(tiny_dirs["llama"]), "data": str(data), "output": str(out), "method": method,
            "method_options": options, "max_steps": 6, "batch_size": 2, "grad_accum": 3, "seed": 1,
            "lr": 1e-2 if method == "lora" else 1e-3, "eval_every": 3, "save_every": 2, "strategy": strategy}


def losses(out: Path, key: str = "loss") -> list[float]:
    return [r[key] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if key in r]


def tunelab_nproc(args: list[str], **extra) -> subprocess.CompletedProcess:
    """`tunelab train --nproc 2 ARGS` (the torchrun wrapper), bounded by LIMIT."""
    return subprocess.run([sys.executable, "-m", "tunelab", "train", "--nproc", "2", "--quiet", *args],
                          env=env(**extra), capture_output=True, text=True, timeout=LIMIT, cwd=ROOT)


def cli_args(cfg: dict) -> list[str]:
    opts = [f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in cfg["method_options"].items()]
    args = [f"--{k.replace('_', '-')}={cfg[k]}" for k in ("model", "data", "output", "method", "max_steps",
                                                         "batch_size", "grad_accum", "seed", "lr", "eval_every",
                                                         "save_every", "strategy")]
    return args + [x for o in opts for x in ("--set", o)]


@pytest.fixture(scope="module")
def runs(tiny_dirs, instruction_jsonl_module, tmp_path_factory):
    """Every case on 2 ranks (one torchrun launch) and on 1 process: {case: (one_dir, two_dir, cfg)}."""
    tmp = tmp_path_factory.mktemp("dist")
    out, files = {}, []
    for case, (method, strategy) in (CASES | MASTER | KEEP).items():
        cfg = config(tiny_dirs, instruction_jsonl_module, tmp / f"{case}-2", method, strategy)
        cfg |= MASTER_SETTINGS if case in MASTER else {"reshard_after_forward": "never"} if case in KEEP else {}
        files.append(tmp / f"{case}.json")
        files[-1].write_text(json.dumps(cfg))
        one = tmp / f"{case}-1"
        train(RunConfig(**(cfg | {"output": str(one), "strategy": "auto"})), progress=False)
        out[case] = (one, tmp / f"{case}-2", cfg)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(HERE / "dist_runner.py"), *map(str, files)]
    done = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=LIMIT, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def instruction_jsonl_module(tmp_path_factory):
    path = tmp_path_factory.mktemp("dist-data") / "pairs.jsonl"
    return write_jsonl(path, arithmetic_pairs(40))


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_give_the_one_process_loss_curve(runs, case):
    one, two, _ = runs[case]
    assert len(losses(two)) == 6
    assert losses(two) == pytest.approx(losses(one), rel=2e-5)
    assert losses(two, "val_loss") == pytest.approx(losses(one, "val_loss"), rel=2e-5)
    summary = json.loads((two / "run.json").read_text())
    assert summary["world_size"] == 2 and summary["strategy"] == CASES[case][1]
    assert len(summary["peak_memory_per_rank"]) == 2 and all(p > 0 for p in summary["peak_memory_per_rank"])


def test_blocks_that_keep_their_gathered_weights_give_the_same_curve(runs):
    """reshard_after_forward never: the backward reuses the forward's gathered weights instead of gathering them
    again; the arithmetic is the same. On CPU auto reshards (no GPU memory to weigh)."""
    one, two, _ = runs["full-fsdp-keep"]
    assert losses(two) == pytest.approx(losses(one), rel=2e-5)
    assert json.loads((two / "run.json").read_text())["keep_gathered"] is True
    assert json.loads((runs["full-fsdp"][1] / "run.json").read_text())["keep_gathered"] is False


def test_keeping_gathered_weights_is_chosen_by_the_models_share_of_the_gpu():
    from tunelab.train.distributed import keeps_gathered

    h200 = 143_771 * 2**20
    assert keeps_gathered("auto", 8.03e9 * 2, h200)  # 8B in bf16: 11% of an H200, as measured 2.4% faster
    assert not keeps_gathered("auto", 70.6e9 * 2, h200)  # 70B: gathering it whole would not fit
    assert not keeps_gathered("auto", 1e6, None)  # CPU: nothing to weigh it against
    assert keeps_gathered("never", 70.6e9 * 2, None) and not keeps_gathered("always", 1e6, h200)


@pytest.mark.parametrize("case", list(MASTER))
def test_master_weights_on_two_ranks_follow_the_one_process_curve_and_save_bf16(runs, case):
    """bf16 compute on both sides; FSDP2 reduces fp32 gradients into fp32 shards where one process steps fp32
    copies of bf16 gradients, so the curves agree to bf16 rounding, not bit for bit."""
    from safetensors import safe_open

    one, two, _ = runs[case]
    assert losses(two) == pytest.approx(losses(one), rel=1e-2)
    assert json.loads((two / "run.json").read_text())["strategy"] == MASTER[case][1]
    for run in (one, two):
        with safe_open(str(run / "artifact" / "model.safetensors"), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # the model's own dtype


def test_one_process_under_torchrun_wraps_nothing_and_gives_the_same_curve(runs, tmp_path):
    one, _, cfg = runs["lora-fsdp"]
    out = tmp_path / "ws1"
    args = cli_args(cfg | {"output": str(out), "strategy": "auto"})
    done = subprocess.run([sys.executable, "-m", "tunelab", "train", "--nproc", "1", "--quiet", *args],
                          env=env(), capture_output=True, text=True, timeout=LIMIT, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "run.json").read_text())
    assert summary["world_size"] == 1 and summary["strategy"] == "none"
    assert losses(out) == pytest.approx(losses(one), rel=2e-5)
    assert (out / "checkpoints").is_dir()  # DCP checkpoints as with more ranks


def test_a_one_process_checkpoint_resumes_on_two_ranks_under_fsdp(runs, tmp_path):
    one, _, cfg = runs["lora-fsdp"]
    out = tmp_path / "grow"
    args = cli_args(cfg | {"output": str(out), "strategy": "auto"})
    killed = subprocess.run([sys.executable, "-m", "tunelab", "train", "--nproc", "1", "--quiet", *args],
                            env=env(TUNELAB_TEST_FAIL_RANK="0:5:kill"), capture_output=True, text=True,
                            timeout=LIMIT, cwd=ROOT)  # after the step-4 checkpoint, saved with no wrapper
    assert killed.returncode != 0 and (out / "checkpoints" / "step-4").is_dir()
    done = tunelab_nproc([*args, "--resume", "--strategy", "fsdp"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "DCP reshards" in done.stderr
    summary = json.loads((out / "run.json").read_text())
    assert summary["world_size"] == 2 and summary["strategy"] == "fsdp"
    assert losses(out)[-2:] == pytest.approx(losses(one)[-2:], rel=1e-4)  # the same samples, resharded state


@pytest.mark.parametrize("case", list(CASES))
def test_artifact_is_the_one_process_format(runs, case):
    one, two, _ = runs[case]
    a, b = one / "artifact", two / "artifact"
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    weights = "adapter_model.safetensors" if CASES[case][0] == "lora" else "model.safetensors"
    wa, wb = load_file(a / weights), load_file(b / weights)
    assert sorted(wa) == sorted(wb) and all(wa[k].dtype == wb[k].dtype for k in wa)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-4) for k in wa)
    for name in ("adapter_config.json", "config.json"):
        if (a / name).exists():
            assert json.loads((a / name).read_text()) == json.loads((b / name).read_text())


def test_artifacts_load_in_peft_and_transformers(runs, tiny_dirs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 6, 7, 8]])
    base = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"])
    with torch.no_grad():
        lora = {n: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]),
                                             runs["lora-fsdp"][i] / "artifact")(ids).logits for i, n in ((0, 1), (1, 2))}
        full = {n: AutoModelForCausalLM.from_pretrained(runs["full-fsdp"][i] / "artifact")(ids).logits
                for i, n in ((0, 1), (1, 2))}
        plain = base(ids).logits
    assert torch.allclose(lora[1], lora[2], atol=1e-4) and not torch.allclose(lora[2], plain, atol=1e-4)
    assert torch.allclose(full[1], full[2], atol=1e-4)


def test_kill_9_of_one_rank_stops_both_and_resume_is_exact(runs):
    _, reference, cfg = runs["lora-fsdp"]
    out = Path(str(reference) + "-killed")
    args = cli_args(cfg | {"output": str(out)})
    started = time.monotonic()
    killed = tunelab_nproc(args, TUNELAB_TEST_FAIL_RANK="1:5:kill")  # after the step-4 checkpoint
    assert killed.returncode == 1, killed.stderr[-2000:]
    assert "error: rank 1 was killed by SIGKILL" in killed.stderr and "Traceback" not in killed.stderr
    assert time.monotonic() - started < LIMIT
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4"]
    resumed = tunelab_nproc(args + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert losses(out) == losses(reference)  # bit-identical on the same world size
    assert (out / "artifact/adapter_model.safetensors").read_bytes() == \
        (reference / "artifact/adapter_model.safetensors").read_bytes()


def test_bad_input_on_one_rank_stops_both_with_one_line(runs):
    _, reference, cfg = runs["lora-ddp"]
    out = Path(str(reference) + "-bad")
    started = time.monotonic()
    done = tunelab_nproc(cli_args(cfg | {"output": str(out)}), TUNELAB_TEST_FAIL_RANK="1:3")
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: rank 1: injected bad input at step 3 (TUNELAB_TEST_FAIL_RANK=1:3)"], done.stderr
    assert "Traceback" not in done.stderr
    assert time.monotonic() - started < LIMIT
    assert not (out / "run.json").exists()


def test_sigterm_checkpoints_on_every_rank_and_exits_0(runs):
    """A scheduler's SIGTERM to the whole job (launcher and ranks): one agreed step, one checkpoint, exit 0."""
    _, reference, cfg = runs["lora-fsdp"]
    out = Path(str(reference) + "-term")
    args = cli_args(cfg | {"output": str(out), "max_steps": 400, "save_every": 1000})
    job = subprocess.Popen([sys.executable, "-m", "tunelab", "train", "--nproc", "2", "--quiet", *args], env=env(),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                           start_new_session=True)
    deadline = time.monotonic() + LIMIT
    while len(losses(out) if (out / "metrics.jsonl").exists() else []) < 2 and job.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    os.killpg(job.pid, signal.SIGTERM)
    _, stderr = job.communicate(timeout=LIMIT)
    assert job.returncode == 0, stderr[-2000:]
    steps = [p.name for p in (out / "checkpoints").iterdir()]
    assert len(steps) == 1 and steps[0] == f"step-{len(losses(out))}"
    assert sorted(p.name for p in (out / "checkpoints" / steps[0]).iterdir()) == [
        "COMPLETE", "dcp", "rank-0.json", "rank-1.json", "state.json"]
    said = [line for line in stderr.splitlines() if "stopped by SIGTERM" in line]
    assert len(set(said)) == 1 and len(said) <= 2 and "Traceback" not in stderr  # rank 0's (log and CLI) only


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_rank_shares_cover_the_window_in_order_with_equal_counts(size):
    from tunelab.train.distributed import World, rank_share

    window = [[0, 1], [2, 3], [4]]  # a short last window: 5 examples in micro-batches of 2
    shares = [rank_share(window, 2, World(rank=r, size=size)) for r in range(size)]
    assert [i for share in shares for micro in share for i in micro] == [0, 1, 2, 3, 4]
    assert len({len(share) for share in shares}) == 1  # the same number of forward passes on every rank
    assert all(len(micro) <= 2 for share in shares for micro in share)


def test_launcher_arguments_and_qlora_refusal():
    from tunelab.errors import ConfigError
    from tunelab.launch import torchrun_argv
    from tunelab.train.distributed import choose_strategy

    assert torchrun_argv(4, ["train", "--nproc", "4", "--method", "lora", "--nproc=4"]) == [
        "--standalone", "--nproc-per-node", "4", "-m", "tunelab", "train", "--method", "lora"]
    with pytest.raises(ConfigError, match="qlora's NF4 base weights cannot be sharded by FSDP2.*--strategy ddp"):
        choose_strategy("fsdp", torch.nn.Linear(2, 2), "qlora")
    assert choose_strategy("auto", torch.nn.Linear(2, 2), "qlora") == "ddp"
    assert choose_strategy("auto", torch.nn.Linear(2, 2), "lora") == "ddp"  # small: replicated
    assert choose_strategy("auto", torch.nn.Linear(2, 2), "lora", 1) == "none"  # one process: no wrapper
    assert choose_strategy("fsdp", torch.nn.Linear(2, 2), "lora", 1) == "fsdp"  # unless asked for


def test_the_failing_rank_is_named_not_the_ones_torchrun_stopped():
    """torchrun records the failures of one poll, then SIGTERMs the ranks still running and records those too:
    whichever rank number it is and in whichever order the ranks were seen, the cause is named."""
    import signal

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from tunelab.launch import _cause

    def failed(*codes):  # (rank, exit code) in the order the agent recorded them
        return ChildFailedError("tunelab", {rank: ProcessFailure(rank, 100 + rank, code, "<N/A>")
                                            for rank, code in codes})

    term, kill = -int(signal.SIGTERM), -int(signal.SIGKILL)
    assert _cause(failed((1, kill), (0, term)))[0] == 1  # the CI run: rank 0 stopped by the agent
    assert _cause(failed((0, 1), (1, kill)))[0] == 1  # rank 0 left on its peer's death, in the same poll
    assert _cause(failed((0, 1), (1, 2)))[0] == 1  # bad input on rank 1 (exit 2), rank 0 stopped (exit 1)
    assert _cause(failed((1, 1), (0, term)))[0] == 1  # rank 1 crashed (its traceback says why), rank 0 stopped
    assert _cause(failed((1, term), (0, term)))[0] == 1  # rank 1 was sent SIGTERM by someone else: recorded first
    assert _cause(failed((1, 1), (0, 1)))[0] == 1  # nothing tells: the first one recorded


def test_auto_replicates_what_fits_a_gpu_and_shards_the_rest(monkeypatch):
    """`auto` on a GPU: DDP while weights + (gradient, bucket, two AdamW moments) of the trainables take at most
    half the GPU's memory, else FSDP2; on CPU the parameter count decides."""
    from tunelab.train import distributed as d

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))  # 2 x 20 fp32 parameters
    model[0].requires_grad_(False)  # a frozen base part: weights only
    assert d.replicated_state(model) == 40 * 4 + 20 * 16
    assert d.replicated_state_fits(model, gpu_memory=2 * 480)
    assert not d.replicated_state_fits(model, gpu_memory=2 * 480 - 1)
    assert d.replicated_state_fits(model)  # on CPU: 40 parameters, below FSDP_AUTO_PARAMS
    monkeypatch.setattr(d, "FSDP_AUTO_PARAMS", 40)
    assert not d.replicated_state_fits(model)
    assert d.choose_strategy("auto", model, "lora") == "fsdp"
    assert d.choose_strategy("auto", model, "qlora") == "ddp"  # NF4 cannot be sharded: replicated regardless
