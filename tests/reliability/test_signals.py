"""Cases 29-33 (issue 16): interruptions exit 130/143 with one line, compare workers die with their parent,
compare refuses a method listed twice, and a compare rerun reuses the strategies that finished.

Real processes get real signals; the model load is slowed down (`slow_load.py`) so a signal lands during it.
"""

from __future__ import annotations

import io
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from harness import subprocess_env
from test_cli_contract import leftovers, one_line_error, train_artifact, write_jsonl

HERE = Path(__file__).resolve().parent
PAIRS = [{"prompt": f"what is {i} plus {i}?", "response": f"{i} plus {i} is {2 * i}."} for i in range(24)]


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_dirs) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("signals")
    pairs = write_jsonl(root / "pairs.jsonl", PAIRS)
    prose = write_jsonl(root / "prose.jsonl", [{"text": f"the quick brown fox jumps over the lazy dog {i}."}
                                               for i in range(8)])
    return {"pairs": pairs, "prose": prose, "lora": train_artifact(tiny_dirs["llama"], pairs, root / "run")}


def wait_for_line(proc: subprocess.Popen, text: str, timeout: float = 90) -> None:
    """Read the process's stdout until a line holds `text`; fail if it ends or time runs out first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            line = proc.stdout.readline()
            if text in line:
                return
            if not line and proc.poll() is not None:
                break
    proc.kill()
    raise AssertionError(f"never saw {text!r} (rc={proc.poll()}): {proc.stderr.read()[-2000:]}")


def alive_with(needle: str) -> list[int]:
    """Pids of live processes (not zombies) whose command line mentions `needle`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in cmdline and state != "Z":
            pids.append(int(entry.name))
    return pids


def reap_all(needle: str) -> None:
    """Test cleanup: SIGKILL what this test started and left alive (by its unique tmp path)."""
    for pid in alive_with(needle):
        os.kill(pid, signal.SIGKILL)


def one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    return lines[0]


def command(kind: str, tiny_dirs, files, out: Path) -> list[str]:
    model = str(tiny_dirs["llama"])
    return {
        "train": ["train", "--model", model, "--data", str(files["pairs"]), "--max-steps", "2", "--output",
                  str(out), "--quiet"],
        "eval": ["eval", "--model", model, "--data", str(files["pairs"]), "--adapter", str(files["lora"])],
        "merge": ["merge", "--model", model, "--adapter", str(files["lora"]), "--output", str(out)],
    }[kind]


@pytest.mark.parametrize("kind, sig", [("train", signal.SIGINT), ("train", signal.SIGTERM), ("eval", signal.SIGINT),
                                       ("merge", signal.SIGINT), ("merge", signal.SIGTERM)])
def test_case29_a_signal_during_the_model_load_exits_128_plus_its_number(tmp_path, tiny_dirs, files, kind, sig):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(HERE / "slow_load.py"), *command(kind, tiny_dirs, files, out)],
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_line(proc, "LOADING")
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, stderr[-3000:]
    line = one_line(stderr)
    assert f"interrupted by {signal.Signals(sig).name}" in line
    if kind != "eval":
        assert str(out) in line  # what was left where
        assert not (out / "run.json").exists() and not (out / "config.json").exists()
    assert leftovers(tmp_path, "out") == []


def _compare(tiny_dirs, files, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tunelab.cli", "compare", "--model", str(tiny_dirs["llama"]), "--data",
            str(files["pairs"]), "--reference-data", str(files["prose"]), "--methods", "lora", "--batch-size", "2",
            "--seq-len", "32", "--output", str(out), *extra]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_case30_compare_stopped_takes_its_worker_with_it(tmp_path, tiny_dirs, files, sig):
    """SIGINT/SIGTERM: exit 130/143, one line, worker gone. SIGKILL (the parent cannot clean up): the worker
    dies anyway."""
    out = tmp_path / "cmp"
    proc = subprocess.Popen(_compare(tiny_dirs, files, out, "--max-steps", "5000"), env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics = out / "runs" / "lora" / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 120
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
            time.sleep(0.1)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
        if sig != signal.SIGKILL:
            assert proc.returncode == 128 + sig, stderr[-3000:]
            line = one_line(stderr)
            assert f"interrupted by {signal.Signals(sig).name}" in line and str(out) in line
        deadline = time.monotonic() + 15
        while alive_with(str(out)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert alive_with(str(out)) == [], "a compare worker outlived its parent"
        size = metrics.stat().st_size
        time.sleep(1.0)
        assert metrics.stat().st_size == size  # nobody is still training into the run dir
    finally:
        reap_all(str(out))


def test_case31_compare_refuses_a_method_listed_twice(capsys, tmp_path, tiny_dirs, files):
    out = tmp_path / "cmp"
    one_line_error(capsys, "compare", "--model", tiny_dirs["llama"], "--data", files["pairs"], "--methods",
                   "lora,ia3,lora", "--max-steps", "1", "--output", out, names=["--methods", "lora"],
                   says=["more than once"])
    assert not (out / "runs").exists()


def test_case32_compare_rerun_reuses_finished_strategies_and_drops_the_old_report(tmp_path, tiny_dirs, files,
                                                                                  monkeypatch):
    from tunelab.measure import compare as compare_module
    from tunelab.measure.compare import build_options, run_compare

    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    out = tmp_path / "cmp"
    values = dict(model=str(tiny_dirs["llama"]), data=str(data), reference_data=str(files["prose"]),
                  methods="lora", max_steps=2, batch_size=2, seq_len=32, output=str(out))
    started, real_worker = [], compare_module._run_worker

    def worker(kind, job, job_dir, *args, **kwargs):
        started.append((kind, (out / "results.json").exists() or (out / "report.md").exists()))
        return real_worker(kind, job, job_dir, *args, **kwargs)

    monkeypatch.setattr(compare_module, "_run_worker", worker)

    def compare() -> str:
        buf = io.StringIO()
        run_compare(build_options(values), console=Console(file=buf, width=250))
        return buf.getvalue()

    compare()
    run_json = (out / "runs" / "lora" / "run.json").read_bytes()
    started.clear()
    said = compare()
    assert [k for k, _ in started] == ["baseline"]  # lora was not trained again
    assert "reused finished strategies" in said and "lora" in said
    assert (out / "runs" / "lora" / "run.json").read_bytes() == run_json
    assert json.loads((out / "results.json").read_text())["strategies"][0]["status"] == "ok"
    assert not any(report_present for _, report_present in started)  # no old report beside new runs
    write_jsonl(data, PAIRS[::-1])  # same path, other contents: retrained
    started.clear()
    said = compare()
    assert [k for k, _ in started] == ["baseline", "strategy"] and "reused" not in said
