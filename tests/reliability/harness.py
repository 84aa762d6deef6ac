"""Fault-injection harness: run training in a subprocess, kill it (SIGKILL, SIGTERM) at chosen moments,
resume, and compare with an uninterrupted run.

As a script, `python harness.py CONFIG.json` builds a `RunConfig` from the JSON and calls `train`, mapping
errors to exit codes as the CLI does (2 for a `TunelabError`, 0 after a SIGTERM checkpoint). Two environment
variables slow it down so a test can aim its kill:
- `HARNESS_STEP_DELAY`: seconds to sleep after every optimizer step;
- `HARNESS_SAMPLES`: a file to which every window's example indices are appended (one JSON line per step).
The training code's own hooks also apply (`TUNELAB_TEST_SAVE_DELAY`, `TUNELAB_TEST_NAN_AT_STEP`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
ROOT = HERE.parents[2]


# --- the runner (in the subprocess) -------------------------------------------------------------------

def _install_hooks() -> None:
    from torch.optim.optimizer import register_optimizer_step_post_hook

    delay = float(os.environ.get("HARNESS_STEP_DELAY", "0") or 0)
    if delay:
        register_optimizer_step_post_hook(lambda *a, **k: time.sleep(delay))
    samples = os.environ.get("HARNESS_SAMPLES")
    if samples:
        from tunelab.train import batches

        original = batches.WindowSampler.next_window

        def logged(self):
            window = original(self)
            with open(samples, "a") as f:
                f.write(json.dumps(window) + "\n")
            return window

        batches.WindowSampler.next_window = logged


def main(config_path: str) -> int:
    """Run one training job from a JSON config; exit codes as the CLI's."""
    import torch

    torch.set_num_threads(1)  # the same in every run: results must not depend on the thread count
    from tunelab.config import RunConfig
    from tunelab.errors import TunelabError
    from tunelab.train import train

    _install_hooks()
    cfg = RunConfig(**json.loads(Path(config_path).read_text()))
    try:
        summary = train(cfg, progress=False)
    except TunelabError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(json.dumps({k: summary.get(k) for k in ("status", "step", "steps", "checkpoint", "signal")}))
    return 0


# --- the driver (in the test process) -----------------------------------------------------------------

def subprocess_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    for key in ("TUNELAB_TEST_SAVE_DELAY", "TUNELAB_TEST_NAN_AT_STEP", "HARNESS_STEP_DELAY", "HARNESS_SAMPLES"):
        env.pop(key, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def base_config(model_dir: Path, data_dir: Path, steps: int) -> dict:
    """A short LoRA run on a tiny model: 40 prompt/response pairs (36 train), windows of 4, dropout on."""
    data = data_dir / "pairs.jsonl"
    rows = [{"prompt": f"what is {i} plus {i}?", "response": f"{i} plus {i} is {2 * i}."} for i in range(40)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"model": str(model_dir), "data": str(data), "method": "lora", "max_steps": steps,
            "batch_size": 4, "lr": 1e-2, "warmup_steps": 2, "eval_every": 4, "save_every": 2, "seed": 3,
            "method_options": {"r": 4, "dropout": 0.1, "target_modules": "all-linear"}}


def write_config(path: Path, **values) -> Path:
    path.write_text(json.dumps(values))
    return path


def start(config: Path, **env: str) -> subprocess.Popen:
    """Start the runner on `config` in the background."""
    return subprocess.Popen([sys.executable, str(HERE), str(config)], env=subprocess_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run(config: Path, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    """Run the runner on `config` to the end."""
    return subprocess.run([sys.executable, str(HERE), str(config)], env=subprocess_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def logged_steps(output: Path) -> list[int]:
    """Steps with a training record in `output/metrics.jsonl` so far (torn last lines ignored)."""
    path = output / "metrics.jsonl"
    steps = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if "loss" in record:
                steps.append(record["step"])
    return steps


def wait_until(condition, proc: subprocess.Popen, timeout: float = 90, what: str = "condition") -> None:
    """Poll `condition()` every 5 ms; fail if the process ends or time runs out first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"run ended (rc={proc.returncode}) before {what}: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def kill_at_step(proc: subprocess.Popen, output: Path, step: int, sig: int = signal.SIGKILL) -> None:
    """Send `sig` as soon as step `step` is logged, and reap the process."""
    wait_until(lambda: any(s >= step for s in logged_steps(output)), proc, what=f"step {step}")
    proc.send_signal(sig)
    proc.communicate(timeout=60)


def kill_after_windows(proc: subprocess.Popen, samples: Path, n: int, sig: int = signal.SIGKILL) -> None:
    """Send `sig` once this process has fetched `n` windows (`HARNESS_SAMPLES`), and reap it.

    Fetching window n means step n-1 of this process is done, its checkpoint included; unlike metrics.jsonl,
    the samples file holds nothing from earlier processes.
    """
    def fetched() -> int:
        return len(samples.read_text().splitlines()) if samples.exists() else 0

    wait_until(lambda: fetched() >= n, proc, what=f"window {n}")
    proc.send_signal(sig)
    proc.communicate(timeout=60)


def saving_now(output: Path) -> bool:
    """Whether a checkpoint temp dir (a save in progress) exists with at least one file in it."""
    root = output / "checkpoints"
    return root.is_dir() and any(p.name.startswith(".tmp-step-") and any(p.iterdir()) for p in root.iterdir())


def train_losses(output: Path) -> dict[int, float]:
    """step -> training loss from `metrics.jsonl`; every step must appear exactly once."""
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    assert len({s for s, _ in train}) == len(train), f"duplicate steps in {output / 'metrics.jsonl'}"
    return dict(train)


def eval_records(output: Path) -> list[dict]:
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "val_loss" in r]


def artifact_tensors(output: Path) -> dict:
    """Every tensor of the artifact's safetensors files."""
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted((output / "artifact").glob("*.safetensors")):
        tensors.update({f"{file.name}:{k}": v for k, v in load_file(file).items()})
    assert tensors, f"no safetensors in {output / 'artifact'}"
    return tensors


def assert_same_run(reference: Path, resumed: Path) -> None:
    """Bit-identical: every logged loss (exact float equality), every eval record, every artifact tensor."""
    import torch

    assert train_losses(resumed) == train_losses(reference)
    assert eval_records(resumed) == eval_records(reference)
    ref, got = artifact_tensors(reference), artifact_tensors(resumed)
    assert ref.keys() == got.keys()
    for key in ref:
        assert torch.equal(ref[key], got[key]), key


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
