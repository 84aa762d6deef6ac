"""The adapter root under abuse (issue 15): a swap race cannot lead out of it, a huge directory is refused fast
and stalls no other load, and links that loop or configs nested 100k deep are 400s naming the adapter.

Live servers on loopback; every loop is bounded in count and time.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import threading
import time

import httpx
import pytest
from serve.helpers import PROMPTS, adapter_root, base_dir, make_service, one_thread  # noqa: F401  (fixtures)

from tunelab.serve.api import create_app
from tunelab.serve.errors import AdapterRejected
from tunelab.serve.server import running

ASK = {"prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0}


def _error(response, status: int) -> str:
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and "\n" not in err["message"]
    return err["message"]


# --- the swap race ------------------------------------------------------------------------------------------

class _Swapper(threading.Thread):
    """Swaps directory `a` and symbolic link `b` for as long as it runs: renameat2(RENAME_EXCHANGE) where libc
    has it (both names always exist), and three renames otherwise. Against a check-then-open-by-name loader,
    about half the loads that pass the check read the outside adapter."""

    def __init__(self, a, b):
        super().__init__(daemon=True)
        self.a, self.b, self.stop, self.swaps = str(a).encode(), str(b).encode(), threading.Event(), 0
        libc = ctypes.CDLL(None, use_errno=True)
        self.exchange = getattr(libc, "renameat2", None)

    def run(self):
        tmp = self.a + b".swap"
        while not self.stop.is_set():
            if self.exchange is not None:
                self.exchange(-100, self.a, -100, self.b, 2)  # AT_FDCWD, RENAME_EXCHANGE
            else:
                os.rename(self.a, tmp)
                os.rename(self.b, self.a)
                os.rename(tmp, self.b)
            self.swaps += 1
            time.sleep(0.0005)  # a flip about every millisecond, in real time, whoever holds the GIL


@pytest.mark.parametrize("openat2", [True, False], ids=["openat2", "part-walk"])
def test_a_swapping_link_never_serves_the_adapter_outside_the_root(make_service, adapter_root, tmp_path,
                                                                  monkeypatch, openat2):
    if not openat2:  # as on a kernel without openat2: the O_NOFOLLOW walk
        from tunelab.serve import confine

        monkeypatch.setattr(confine, "_openat2", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSYS, "no")))
    outside, root = tmp_path / "outside", tmp_path / "root"
    shutil.copytree(adapter_root / "b", outside / "evil")
    shutil.copytree(adapter_root / "a", root / "x")
    (root / "parked").symlink_to(outside / "evil", target_is_directory=True)
    service = make_service({"ref_a": adapter_root / "a", "ref_b": adapter_root / "b"}, adapter_root=root,
                           max_adapters=4)
    swapper = _Swapper(root / "x", root / "parked")
    with running(create_app(service)) as url, httpx.Client(base_url=url, timeout=60) as http:
        good, evil = (http.post("/v1/completions", json={**ASK, "model": m}).json()["choices"][0]["text"]
                      for m in ("ref_a", "ref_b"))
        assert good != evil  # else the test could not tell them apart
        served, refused, deadline = [], 0, time.monotonic() + 20
        swapper.start()
        try:
            while len(served) + refused < 40 and time.monotonic() < deadline:
                r = http.post("/v1/completions", json={**ASK, "model": "x"})
                if r.status_code == 200:
                    served.append(r.json()["choices"][0]["text"])
                    service.registry.unload("x")  # the next request loads it afresh
                else:
                    assert r.status_code in (400, 404), r.text
                    refused += 1
        finally:
            swapper.stop.set()
            swapper.join(10)
    assert swapper.swaps > 100 and served, (swapper.swaps, len(served), refused)
    assert evil not in served and set(served) == {good}


# --- a huge directory ---------------------------------------------------------------------------------------

def test_a_huge_adapter_dir_is_refused_fast_and_stalls_no_other_load(make_service, adapter_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(adapter_root / "a", root / "a")
    (root / "huge").mkdir()
    (root / "huge" / "f0").write_bytes(b"")
    for i in range(1, 10_000):  # hard links: a directory of 10k entries, cheaply
        os.link(root / "huge" / "f0", root / "huge" / f"f{i}")
    service = make_service(adapter_root=root)
    with running(create_app(service)) as url, httpx.Client(base_url=url, timeout=60,
                                                           limits=httpx.Limits(max_connections=16)) as http:
        times: dict[str, list[float]] = {"huge": [], "a": []}

        def ask(name):
            start = time.monotonic()
            r = http.post("/v1/completions", json={**ASK, "model": name})
            times[name].append(time.monotonic() - start)
            if name == "huge":
                assert "holds more than 64 entries" in _error(r, 400)
            else:
                assert r.status_code == 200, r.text

        threads = [threading.Thread(target=ask, args=(n,)) for n in ["huge"] * 6 + ["a"]]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert len(times["huge"]) == 6 and len(times["a"]) == 1
    assert max(times["huge"]) < 2.0 and times["a"][0] < 2.0, times


# --- links that loop, configs nested too deep --------------------------------------------------------------

@pytest.fixture
def odd_root(tmp_path, adapter_root):
    root = tmp_path / "root"
    shutil.copytree(adapter_root / "a", root / "fine")
    shutil.copytree(adapter_root / "a", root / "loop")
    (root / "loop" / "self").symlink_to("self")  # a link to itself
    (root / "loop" / "sub").mkdir()
    (root / "loop" / "sub" / "up").symlink_to("..", target_is_directory=True)  # a cycle through a directory
    (root / "selflink").symlink_to("selflink")
    deep = "[" * 100_000 + "]" * 100_000
    shutil.copytree(adapter_root / "a", root / "deepconfig")
    (root / "deepconfig" / "adapter_config.json").write_text('{"peft_type": "LORA", "x": ' + deep + "}")
    shutil.copytree(adapter_root / "a", root / "deepsidecar")
    (root / "deepsidecar" / "tunelab.json").write_text('{"method": "lora", "options": ' + deep + "}")
    return root


@pytest.mark.parametrize("name, words", [
    ("loop", "file self is a symbolic link"),
    ("selflink", "symbolic link"),
    ("deepconfig", "adapter_config.json: JSON nested too deeply"),
    ("deepsidecar", "tunelab.json: JSON nested too deeply"),
])
def test_link_loops_and_deep_json_are_400s_naming_the_adapter(make_service, odd_root, name, words):
    service = make_service(adapter_root=odd_root)
    with running(create_app(service)) as url, httpx.Client(base_url=url, timeout=60) as http:
        r = http.post("/v1/completions", json={**ASK, "model": name})
        assert r.status_code in (400, 404), r.text
        message = _error(r, r.status_code)
        assert repr(name) in message and words in message and str(odd_root) not in message
        assert http.post("/v1/completions", json={**ASK, "model": "fine"}).status_code == 200


def test_adapter_files_are_read_only_through_the_opened_directory(tmp_path, adapter_root):
    """The copy holds exactly the adapter's files the loader reads, byte for byte; nothing else is read."""
    from tunelab.serve.confine import COPIED, adapter_copy

    root = tmp_path / "root"
    shutil.copytree(adapter_root / "a", root / "team" / "a")
    (root / "team" / "a" / "notes").mkdir()
    (root / "team" / "a" / "notes" / "big.bin").write_bytes(b"\0" * 100)
    with adapter_copy(root, "team/a", max_bytes=10**9) as copy:
        files = {p.name: p.read_bytes() for p in copy.iterdir()}
        assert oct(copy.stat().st_mode & 0o777) == "0o700"
    assert files == {p.name: p.read_bytes() for p in (root / "team" / "a").iterdir() if p.name in COPIED}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(files)
    assert not copy.exists()
    with pytest.raises(AdapterRejected, match="file adapter_model.safetensors has more than 10 bytes"):
        with adapter_copy(root, "team/a", max_bytes=10):
            pass
    assert json.loads((root / "team" / "a" / "adapter_config.json").read_text())  # the source is untouched


def test_a_burst_of_first_requests_reads_the_adapter_once(make_service, adapter_root, monkeypatch):
    from tunelab.serve import registry

    copies = []
    real = registry.adapter_copy
    monkeypatch.setattr(registry, "adapter_copy", lambda *a, **k: (copies.append(a[1]), real(*a, **k))[1])
    service = make_service(adapter_root=adapter_root)
    with running(create_app(service)) as url, httpx.Client(base_url=url, timeout=60) as http:
        codes = []
        threads = [threading.Thread(target=lambda: codes.append(
            http.post("/v1/completions", json={**ASK, "model": "a"}).status_code)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert codes == [200] * 8 and copies == ["a"]
