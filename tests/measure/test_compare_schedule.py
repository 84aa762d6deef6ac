"""`compare --devices`: the scheduler on its own (no device runs two jobs at once, a seed after its lr search,
everything finishes, results as a sequential run), each worker's view of its GPU, and the option's checks."""

from __future__ import annotations

import threading
import time

import pytest

from tunelab.cli import main
from tunelab.errors import ConfigError
from tunelab.measure.compare import build_options
from tunelab.measure.compare_schedule import Job, Stopped, check, check_devices, run_jobs, worker_env


class Recorder:
    """Jobs that record (key, device, start, end) and how many jobs each device runs at the same moment."""

    def __init__(self, seconds: float = 0.02):
        self.seconds, self.lock = seconds, threading.Lock()
        self.spans: dict = {}
        self.active: dict[str, int] = {}
        self.most: dict[str, int] = {}

    def job(self, key, after=None, barrier: threading.Barrier | None = None) -> Job:
        def run(device, done):
            with self.lock:
                self.active[device] = self.active.get(device, 0) + 1
                self.most[device] = max(self.most.get(device, 0), self.active[device])
            start = time.monotonic()
            if after is not None:
                assert after in done  # its dependency's result is handed over
            if barrier is not None:
                barrier.wait()  # passes only while another job runs on another device at the same time
            time.sleep(self.seconds)
            with self.lock:
                self.active[device] -= 1
            self.spans[key] = (device, start, time.monotonic())
            return (key, done[after] if after is not None else None)
        return Job(key, run, after)


def _compare_jobs(rec: Recorder, strategies=("full", "lora", "ia3", "bitfit"), seeds=3) -> list[Job]:
    jobs = []
    for name in strategies:
        jobs.append(rec.job((name, "lr")))
        jobs += [rec.job((name, i), after=(name, "lr")) for i in range(seeds)]
    return jobs


@pytest.mark.parametrize("devices", [["cuda:0"], ["cuda:0", "cuda:1"], ["cuda:0", "cuda:1", "cuda:2"]])
def test_no_device_runs_two_jobs_and_seeds_follow_their_search(devices):
    rec = Recorder()
    jobs = _compare_jobs(rec)
    results = run_jobs(jobs, devices)
    assert set(results) == {j.key for j in jobs}  # everything finished
    assert max(rec.most.values()) == 1 and set(rec.most) <= set(devices)
    for key, (device, start, _) in rec.spans.items():
        if key[1] != "lr":
            assert start >= rec.spans[(key[0], "lr")][2]  # after its search ended
            assert results[key] == (key, ((key[0], "lr"), None))  # with the search's result
    for device in devices:  # one device's spans never overlap
        spans = sorted((s, e) for d, s, e in rec.spans.values() if d == device)
        assert all(e1 <= s2 for (_, e1), (s2, _) in zip(spans, spans[1:]))
    sequential = run_jobs(_compare_jobs(Recorder(0)), ["cpu"])
    assert results == sequential  # the same results as a run one after the other


def test_one_device_runs_in_list_order_in_the_calling_thread():
    order, threads = [], set()

    def job(key, after=None):
        return Job(key, lambda device, done: (order.append(key), threads.add(threading.get_ident())), after)

    run_jobs([job("a"), job("a0", "a"), job("b"), job("b0", "b")], ["cpu"])
    assert order == ["a", "a0", "b", "b0"] and threads == {threading.get_ident()}


def test_two_devices_run_two_jobs_at_once():
    """Two independent searches can only pass a barrier of 2 if they really run at the same time."""
    rec, barrier = Recorder(), threading.Barrier(2, timeout=10)
    results = run_jobs([rec.job("a", barrier=barrier), rec.job("b", barrier=barrier)], ["cuda:0", "cuda:1"])
    assert set(results) == {"a", "b"} and {d for d, _, _ in rec.spans.values()} == {"cuda:0", "cuda:1"}


def test_a_failing_job_stops_the_others_and_is_raised():
    stop, seen = threading.Event(), []

    def slow(device, done):
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # a worker's poll: killed once the compare stops
            try:
                check(stop)
            except Stopped:
                seen.append("stopped")
                raise
            time.sleep(0.01)

    def bad(device, done):
        time.sleep(0.05)
        raise RuntimeError("boom")

    never = Job("never", lambda device, done: seen.append("started"), after="bad")
    with pytest.raises(RuntimeError, match="boom"):
        run_jobs([Job("slow", slow), Job("bad", bad), never], ["cuda:0", "cuda:1"], stop)
    assert seen == ["stopped"]


def test_an_interrupt_of_the_compare_stops_every_running_job():
    """Ctrl-C / SIGTERM arrive in the main thread (as `Interrupted`; here KeyboardInterrupt): both devices' jobs
    are stopped before it is raised again, and the waiting job never starts."""
    import _thread

    stop, seen = threading.Event(), []

    def looping(device, done):
        deadline = time.monotonic() + 10  # a scheduler that never sets `stop` fails the test, not hangs it
        try:
            while time.monotonic() < deadline:
                check(stop)
                time.sleep(0.01)
        except Stopped:
            seen.append(device)
            raise

    never = Job("never", lambda device, done: seen.append("started"), after="a")
    timer = threading.Timer(0.3, _thread.interrupt_main)
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        run_jobs([Job("a", looping), Job("b", looping), never], ["cuda:0", "cuda:1"], stop)
    assert sorted(seen) == ["cuda:0", "cuda:1"]


def test_jobs_must_name_an_earlier_dependency():
    with pytest.raises(ValueError, match="earlier job"):
        run_jobs([Job("a0", lambda d, r: None, after="a"), Job("a", lambda d, r: None)], ["cpu"])


def test_each_worker_sees_only_its_gpu(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert worker_env("cuda:1") == {"CUDA_VISIBLE_DEVICES": "1"}
    assert worker_env("cpu") == {} and worker_env("auto") == {} and worker_env("cuda") == {}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")  # this process's cuda:1 is the machine's GPU 6
    assert worker_env("cuda:0") == {"CUDA_VISIBLE_DEVICES": "4"}
    assert worker_env("cuda:1") == {"CUDA_VISIBLE_DEVICES": "6"}


def test_devices_option_sets_the_device_kind():
    opts = build_options({"devices": "cuda:0, cuda:1"})
    assert opts.devices == ["cuda:0", "cuda:1"] and opts.device == "cuda"
    assert build_options({"devices": "cpu"}).device == "cpu"
    assert build_options({}).devices is None and build_options({}).device == "auto"
    assert build_options({"devices": "cpu", "nproc": 2}).nproc == 2  # one CPU: --nproc still works


@pytest.mark.parametrize("values, says", [
    ({"devices": "cpu,cpu"}, "cpu listed more than once"),
    ({"devices": "cuda:0,cuda:0"}, "cuda:0 listed more than once"),
    ({"devices": "cpu,cuda:0"}, "cpu beside other devices"),
    ({"devices": "gpu1"}, "'gpu1' is not a device"),
    ({"devices": ","}, "none given"),
    ({"devices": "cuda:0,cuda:1", "device": "cpu"}, "disagree"),
    ({"devices": "cuda:0,cuda:1", "nproc": 2}, "expected one of them"),
])
def test_bad_devices_are_one_line_errors_naming_the_key(values, says):
    with pytest.raises(ConfigError) as e:
        build_options(values)
    text = str(e.value)
    assert "devices" in text and says in text and "\n" not in text


def test_a_gpu_the_machine_lacks_is_refused_before_anything_runs(tmp_path, capsys):
    with pytest.raises(ConfigError, match="cuda:2 is not on this machine.*2 visible CUDA devices"):
        check_devices(["cuda:0", "cuda:2"], 2)
    check_devices(["cuda:0", "cuda:1"], 2)
    out = tmp_path / "out"
    code = main(["compare", "--devices", "cuda:0,cuda:7", "--methods", "lora", "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "--devices cuda:0,cuda:7" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_devices_in_the_compare_yaml_name_the_file(tmp_path, capsys):
    config = tmp_path / "compare.yaml"
    config.write_text("devices: [cuda:0, cuda:0]\n")
    assert main(["compare", "--config", str(config), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(config) in err and "'devices'" in err and "listed more than once" in err


def test_two_devices_end_to_end_equal_a_sequential_compare(tmp_path, tiny_dirs, monkeypatch):
    """Two fake GPUs that map to the CPU (a test hook: the compare's devices, with an empty worker environment in
    place of CUDA_VISIBLE_DEVICES): both take runs, and a sequential compare into the same output dir reuses
    every run and reports the same figures."""
    import io
    import json

    from rich.console import Console

    from builders import write_jsonl
    from tunelab.measure import compare as compare_module

    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"what is {i} plus {i}?", "response": f"{2 * i}."}
                                                  for i in range(24)])
    prose = write_jsonl(tmp_path / "prose.jsonl", [{"text": f"the quick brown fox {i}. " * 4} for i in range(6)])
    values = dict(model=str(tiny_dirs["llama"]), data=str(data), reference_data=str(prose), methods="lora,ia3",
                  max_steps=2, batch_size=2, seq_len=32, reference_sequences=4, eval_batches=2,
                  output=str(tmp_path / "out"))
    used, started = [], []

    class TwoFakeGpus(compare_module._Context):
        def __init__(self, *args):
            super().__init__(*args)
            self.devices = ["cuda:0", "cuda:1"]
            self.env_for = lambda device: used.append(device) or {}

    real_worker = compare_module._run_worker
    monkeypatch.setattr(compare_module, "_run_worker",
                        lambda kind, *a, **k: started.append(kind) or real_worker(kind, *a, **k))

    def compare(opts):
        return compare_module.run_compare(opts, console=Console(file=io.StringIO(), width=250))

    with monkeypatch.context() as patch:
        patch.setattr(compare_module, "_Context", TwoFakeGpus)
        spread = compare(build_options(values))
    assert spread.devices == ["cuda:0", "cuda:1"] and sorted(set(used)) == ["cuda:0", "cuda:1"]
    assert "cuda:0, cuda:1: the runs spread over 2 devices" in (tmp_path / "out" / "report.md").read_text()
    started.clear()
    sequential = compare(build_options(values))
    assert started == ["baseline"]  # every run of the spread compare is reused by the sequential one
    assert sequential.devices == ["cpu"]
    drop = {"created", "devices", "load_average", "warnings"}
    assert json.dumps(sequential.model_dump(exclude=drop)) == json.dumps(spread.model_dump(exclude=drop))
    assert [s.status for s in spread.strategies] == ["ok", "ok"]
