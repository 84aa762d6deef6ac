"""The adapters a server holds: where each comes from, which are loaded, and which are in use.

Adapters come from `--adapter NAME=DIR` at start or, by name, from directories under `--adapter-root`.
A requested name is a short path below the root and nothing more: absolute paths and `..` parts are refused
before anything is opened. A root adapter is then read through descriptors into a private copy
(`confine.adapter_copy`), so nothing outside the root is read even while the root is being rewritten, and it
is read and checked outside the one load lock: a slow or refused name delays no load of another name.

At most `max_adapters` are loaded. Each request holds a reference on its adapter from `acquire` to `release`;
loading one more evicts the least recently used adapter that no request holds. When all are held, the load waits
for one to be released, at most `slot_wait_s` seconds from the request's arrival, and then refuses with `Busy`.
Adapters above `max_rank`, of a method that cannot be served, or whose files are corrupt are refused with a
message naming the adapter. On the model, adapters carry internal keys (`serve_0`, ...), so
public names need not be valid module names.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch

from tunelab.artifacts import load_adapter, merge_and_unload
from tunelab.errors import ConfigError, TunelabError
from tunelab.methods import get_method
from tunelab.methods.base import adapter_state
from tunelab.serve.adapter_files import (
    Servable,
    inspect_adapter,
    mixed_batch_ok,
    public_message,
)
from tunelab.serve.confine import adapter_copy
from tunelab.serve.errors import AdapterRejected, Busy, ModelNotFound
from tunelab.serve.finite import check_finite
from tunelab.serve.metrics import ServeMetrics

log = logging.getLogger("tunelab.serve")
_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_NAME_CHARS = 256
_KEY = re.compile(r"\bserve_[0-9]+\b")  # the keys `_keys` makes
SLOT_WAIT_S = 30.0  # how long a load may wait for a held adapter to be released (--slot-wait)


@dataclass
class Adapter:
    """One known adapter: public `name`, key on the model (`None` while unloaded), source dir, the method that
    wrote it and the method it is loaded with (`served_as`; they differ for qlora, served as the LoRA it saved)."""

    name: str
    path: Path
    method: str = ""
    served_as: str = ""
    key: str | None = None
    given: bool = False  # from `--adapter NAME=DIR` (else found under the adapter root)
    mixed: bool = False
    refs: int = 0
    last_used: int = 0


def check_name(name: str) -> None:
    """Refuse a public adapter name that is not a short relative path of plain parts (letters, digits, `._-`)."""
    if len(name) > MAX_NAME_CHARS:  # the OS would refuse the path (ENAMETOOLONG) after work it need not do
        raise AdapterRejected(f"adapter name of {len(name)} characters: expected at most {MAX_NAME_CHARS}")
    if not name or PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or name[:1] in "/\\":
        raise AdapterRejected(f"adapter name {name!r}: expected a name relative to the adapter root, "
                              "found an absolute path")
    parts = name.split("/")
    if ".." in parts or "\\" in name:
        raise AdapterRejected(f"adapter name {name!r}: expected a name inside the adapter root, found '..' "
                              "or '\\' in it")
    bad = next((p for p in parts if not _PART.fullmatch(p)), None)
    if bad is not None:
        raise AdapterRejected(f"adapter name {name!r}: part {bad!r} should be letters, digits, '.', '_' or '-' "
                              "(starting with a letter or digit)")


class AdapterRegistry:
    """Loads, counts references to and evicts the adapters on one served model (thread-safe).

    `lock` is the model lock the engine holds during forwards; adapters are attached and removed under it.
    """

    def __init__(self, model, lock: threading.RLock, *, base_name: str, adapter_root: Path | None = None,
                 max_adapters: int = 8, max_rank: int = 64, metrics: ServeMetrics | None = None,
                 slot_wait_s: float = SLOT_WAIT_S):
        self.model, self.lock, self.base_name, self.slot_wait_s = model, lock, base_name, slot_wait_s
        self.metrics = metrics or ServeMetrics()
        self.metrics.gauge("tunelab_adapters_resident", "adapters loaded on the base now",
                           lambda: sum(1 for a in list(self._known.values()) if a.key))
        self.adapter_root = Path(adapter_root) if adapter_root is not None else None
        self.max_adapters, self.max_rank = max_adapters, max_rank
        self._known: dict[str, Adapter] = {}  # every adapter given at start or loaded once, by public name
        self._meta = threading.Lock()  # guards refs, last_used, key and _known
        self._freed = threading.Condition(self._meta)  # notified when an adapter's last hold is released
        self._load_lock = threading.Lock()  # one attach at a time: never two loads racing for the last slot
        self._name_locks: dict[str, tuple[threading.Lock, int]] = {}  # per name: its lock and how many wait on it
        self._clock = itertools.count(1)
        self._keys = (f"serve_{i}" for i in itertools.count())
        self._base_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    # --- public -----------------------------------------------------------------------------------------
    def add(self, name: str, path: Path) -> Adapter:
        """Register and load an operator-given adapter (`--adapter NAME=DIR`); errors name it."""
        check_name(name)
        if name == self.base_name:
            raise AdapterRejected(f"adapter name {name!r} is the base model's name; choose another")
        if name in self._known:
            raise AdapterRejected(f"adapter name {name!r} is given twice")
        if not Path(path).is_dir():
            raise ModelNotFound(f"adapter {name!r}: {path} is not a directory")
        self._known[name] = Adapter(name, Path(path), given=True)
        self.release(self.acquire(name))
        return self._known[name]

    def acquire(self, name: str) -> str | None:
        """Hold adapter `name` for one request, loading it if needed; returns its key on the model.

        The base model's name gives None. Raises `ModelNotFound`, `AdapterRejected` or `Busy`.
        """
        if name == self.base_name:
            return None
        if (key := self._hold(name)) is not None:
            return key
        deadline = time.monotonic() + self.slot_wait_s
        # the files are read and checked before the load lock, one request per name at a time: a slow or
        # refused name delays no load of another name, and a burst of first requests reads its files once
        with self._one_per_name(name):
            if (key := self._hold(name)) is not None:  # loaded by the request we waited for
                return key
            with self._source(name) as (adapter, files):
                servable = inspect_adapter(name, files, max_rank=self.max_rank, max_bytes=self._base_bytes)
                check_finite(name, files)
                if not self._load_lock.acquire(timeout=max(deadline - time.monotonic(), 0)):
                    raise self._busy(name)
                try:
                    self._make_room(name, deadline)
                    start = time.monotonic()
                    self._attach(adapter, servable, files)
                    self.metrics.observe("tunelab_adapter_load_seconds", time.monotonic() - start)
                    self.metrics.add("tunelab_adapter_loads_total")
                    with self._meta:
                        self._known[name] = adapter
                        adapter.refs, adapter.last_used = 1, next(self._clock)
                    return adapter.key
                finally:
                    self._load_lock.release()

    def release(self, key: str | None) -> None:
        """Give back a hold taken by `acquire` (None, the base, is a no-op)."""
        if key is None:
            return
        with self._meta:
            adapter = next(a for a in self._known.values() if a.key == key)
            adapter.refs -= 1
            if adapter.refs == 0:
                self._freed.notify_all()

    def loaded(self) -> list[Adapter]:
        """The loaded adapters, most recently used first."""
        with self._meta:
            return sorted((a for a in self._known.values() if a.key), key=lambda a: -a.last_used)

    def public_text(self, text: str) -> str:
        """`text` with every internal adapter key (`serve_3`) replaced by the adapter's public name."""
        with self._meta:
            names = {a.key: a.name for a in self._known.values() if a.key}
        return _KEY.sub(lambda m: names.get(m.group(), m.group()), text)

    def mixed_batch(self, key: str) -> bool:
        """Whether the adapter with model key `key` can share a batch with other adapters' rows."""
        with self._meta:
            return any(a.mixed for a in self._known.values() if a.key == key)

    def unload(self, name: str) -> None:
        """Remove loaded adapter `name` from the model now; `Busy` while a request holds it."""
        with self._meta:
            adapter = self._known.get(name)
            if adapter is None or adapter.key is None:
                raise ModelNotFound(f"adapter {name!r} is not loaded")
            if adapter.refs:
                raise Busy(f"adapter {name!r} is in use by {adapter.refs} running request(s); retry later")
            key, adapter.key = adapter.key, None
        self._detach(key)

    def merge_into_base(self, name: str, served_as: str | None = None) -> None:
        """Fold loaded adapter `name` into the base weights and drop it; the base is then served as `served_as`
        (default: `name`)."""
        adapter = self._known[name]
        if not get_method(adapter.served_as).mergeable:
            raise ConfigError(f"--merge {name}: method '{adapter.method}' cannot be merged into the base "
                              "weights; serve it as an adapter instead")
        with self.lock:
            merge_and_unload(self.model, adapter.key)
        with self._meta:
            self._known.clear()
            self.base_name = served_as or name

    # --- internals --------------------------------------------------------------------------------------
    def _hold(self, name: str) -> str | None:
        with self._meta:
            adapter = self._known.get(name)
            if adapter is None or adapter.key is None:
                return None
            adapter.refs += 1
            adapter.last_used = next(self._clock)
            return adapter.key

    @contextlib.contextmanager
    def _one_per_name(self, name: str) -> Iterator[None]:
        """Hold the lock of `name` (made on first use, dropped when no request waits on it)."""
        with self._meta:
            lock, users = self._name_locks.get(name, (threading.Lock(), 0))
            self._name_locks[name] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._meta:
                lock, users = self._name_locks[name]
                if users == 1:
                    del self._name_locks[name]
                else:
                    self._name_locks[name] = (lock, users - 1)

    @contextlib.contextmanager
    def _source(self, name: str) -> Iterator[tuple[Adapter, Path]]:
        """Adapter `name` and the directory its files are read from: an operator-given adapter's own directory,
        or a private copy of a root adapter, read through descriptors (`confine.adapter_copy`) afresh on every
        load. Raises `ModelNotFound` or `AdapterRejected` naming it."""
        adapter = self._known.get(name)
        if adapter is not None and adapter.given:
            yield adapter, adapter.path
            return
        check_name(name)
        if self.adapter_root is None:
            known = ", ".join([self.base_name, *(a.name for a in self.loaded())])
            raise ModelNotFound(f"model {name!r} not found; this server has no adapter root and serves: {known}")
        with adapter_copy(self.adapter_root, name, max_bytes=self._base_bytes) as files:
            yield Adapter(name, self.adapter_root / name), files

    def _make_room(self, name: str, deadline: float) -> None:
        """Evict the least recently used idle adapter when all slots are taken; when none is idle, wait for one
        until `deadline` (time.monotonic), then refuse with `Busy` naming adapter `name`."""
        with self._freed:
            while True:
                loaded = [a for a in self._known.values() if a.key]
                if len(loaded) < self.max_adapters:
                    return
                idle = [a for a in loaded if a.refs == 0]
                if idle:
                    break
                if not self._freed.wait(max(deadline - time.monotonic(), 0)):  # False: the time is up
                    raise self._busy(name)
            victim = min(idle, key=lambda a: a.last_used)
            key, victim.key = victim.key, None  # from here no request can take it
            if not victim.given:
                del self._known[victim.name]
        self._detach(key)
        self.metrics.add("tunelab_adapter_evictions_total")

    def _busy(self, name: str) -> Busy:
        return Busy(f"adapter {name!r}: all {self.max_adapters} adapter slots (--max-adapters) are in use by "
                    f"running requests, after a wait of {self.slot_wait_s:g} s (--slot-wait); retry later")

    def _attach(self, adapter: Adapter, servable: Servable, files: Path) -> None:
        """Load the adapter's weights from `files` onto the model under a fresh key; probe mixed-batch support."""
        key = next(self._keys)
        with self.lock:
            try:
                load_adapter(self.model, files, key, as_method=servable.served_as)
            except Exception as err:  # a file tunelab's checks missed must not take the server down either
                try:
                    self._detach(key)
                except Exception:
                    log.exception("adapter %r: could not remove what a failed load left on the model", adapter.name)
                reason = public_message(err, files, adapter.name, key)
                if not isinstance(err, TunelabError):
                    reason = f"{type(err).__name__}: {reason}"
                raise AdapterRejected(f"adapter {adapter.name!r}: cannot be loaded ({reason})") from None
            for p in self.model.parameters():
                p.requires_grad_(False)
            self.model.eval()
            adapter_state(self.model).active = ()
            mixed = mixed_batch_ok(self.model, servable.served_as, key)
        adapter.method, adapter.served_as = servable.method, servable.served_as
        adapter.key, adapter.mixed = key, mixed

    def _detach(self, key: str) -> None:
        """Remove adapter `key` from the model (whatever part of it a failed load left behind)."""
        with self.lock:
            if key in adapter_state(self.model).methods:
                get_method(adapter_state(self.model).methods[key]).remove(self.model, key)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
