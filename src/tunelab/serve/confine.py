"""Reading an adapter from under the adapter root so that no link, and no race, leads out of it.

A check of a path *name* followed by opens of the same name can be raced: between them, a local user swaps the
checked directory for a symbolic link to an adapter outside the root. So an adapter is read through file
descriptors, never names:
- its directory is opened once, relative to the root's descriptor: with `openat2(RESOLVE_BENEATH)` where the
  kernel has it (Linux 5.6+; links inside the root are followed, never out of it), and otherwise one part at a
  time with `O_NOFOLLOW` (no link below the root is followed at all);
- its files are listed and opened through that directory's descriptor with `O_NOFOLLOW`, and `fstat` checks
  that what was opened is a regular file (a link swapped in after the listing fails to open);
- the files tunelab's adapter loader reads (`COPIED`) are copied into a private directory (mode 0700), which
  is what the checks and the loader then read; the directory's other files are listed and checked, never read.

The walk is bounded: an adapter directory holds a handful of files, so one holding more than `MAX_ENTRIES`
entries is refused after reading that many names, and a file over its byte limit after that many bytes.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tunelab.artifacts.files import SIDECAR
from tunelab.artifacts.hf_model import CONFIG as MODEL_CONFIG
from tunelab.artifacts.peft_format import CONFIG as ADAPTER_CONFIG, WEIGHTS
from tunelab.serve.errors import AdapterRejected, ModelNotFound

MAX_ENTRIES = 64
MAX_JSON_BYTES = 16 * 2**20
# what the loader reads, with each file's byte limit (None: the weights' limit given to `adapter_copy`)
COPIED = {ADAPTER_CONFIG: MAX_JSON_BYTES, SIDECAR: MAX_JSON_BYTES, MODEL_CONFIG: MAX_JSON_BYTES, WEIGHTS: None}
_SYS_OPENAT2 = 437  # the same number on every Linux architecture
_RESOLVE_NO_MAGICLINKS, _RESOLVE_BENEATH = 0x02, 0x08
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # NONBLOCK: a FIFO never blocks open
_CHUNK = 1 << 20


@contextlib.contextmanager
def adapter_copy(root: Path, name: str, max_bytes: int) -> Iterator[Path]:
    """A private copy of adapter `name`'s files under `root` (those in `COPIED`), read as the module says.

    `name` must already have passed `registry.check_name`. Raises `ModelNotFound` when there is no such
    directory, `AdapterRejected` naming the adapter when it leads out of the root, holds a link or a special
    file, more than `MAX_ENTRIES` entries, a weights file over `max_bytes` or a JSON file over
    `MAX_JSON_BYTES`. The copy is removed on leaving.
    """
    with _opened_dir(root, name) as dir_fd, tempfile.TemporaryDirectory(prefix="tunelab-adapter-") as tmp:
        for entry in _entries(dir_fd, name):
            if entry in COPIED:
                _copy_file(dir_fd, entry, Path(tmp) / entry, name, COPIED[entry] or max_bytes)
        yield Path(tmp)


@contextlib.contextmanager
def _opened_dir(root: Path, name: str) -> Iterator[int]:
    root_fd = os.open(root, _DIR_FLAGS)
    try:
        fd = _open_beneath(root_fd, name)
    finally:
        os.close(root_fd)
    try:
        yield fd
    finally:
        os.close(fd)


def _open_beneath(root_fd: int, name: str) -> int:
    """A descriptor of directory `name` below `root_fd` that no link out of the root can have redirected."""
    try:
        return _openat2(root_fd, name)
    except OSError as err:
        if err.errno not in (errno.ENOSYS, errno.EPERM, errno.EOPNOTSUPP):  # the kernel answered: use it
            raise _dir_error(err, name) from None
    fd = os.dup(root_fd)
    for part in name.split("/"):  # no openat2 here: a part-by-part walk that follows no link
        try:
            nxt = os.open(part, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
        except OSError as err:
            if err.errno in (errno.ELOOP, errno.ENOTDIR):
                raise AdapterRejected(f"adapter name {name!r}: part {part!r} is a symbolic link or not a directory;"
                                      " without openat2 no link below the root is followed, so none resolves "
                                      "outside the adapter root; expected a directory") from None
            raise _dir_error(err, name) from None
        finally:
            os.close(fd)
        fd = nxt
    return fd


def _openat2(dir_fd: int, path: str) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    how = struct.pack("QQQ", _DIR_FLAGS, 0, _RESOLVE_BENEATH | _RESOLVE_NO_MAGICLINKS)  # struct open_how
    fd = libc.syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(dir_fd), ctypes.c_char_p(path.encode()),
                      ctypes.c_char_p(how), ctypes.c_size_t(len(how)))
    if fd < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return fd


def _dir_error(err: OSError, name: str) -> Exception:
    if err.errno == errno.ENOENT:
        return ModelNotFound(f"model {name!r}: no such adapter directory under the adapter root")
    what = {errno.EXDEV: "resolves outside the adapter root (a symbolic link)",
            errno.ELOOP: "is a symbolic link that loops", errno.ENOTDIR: "is not a directory"}.get(err.errno)
    if what is not None:
        return AdapterRejected(f"adapter name {name!r}: {what}; expected a directory inside the adapter root")
    return AdapterRejected(f"adapter name {name!r}: cannot be opened ({err.strerror})")


def _entries(dir_fd: int, name: str) -> list[str]:
    """The names of the regular files directly in `dir_fd` (sub-directories are never read); at most MAX_ENTRIES."""
    files = []
    with os.scandir(dir_fd) as it:
        for count, entry in enumerate(it, 1):
            if count > MAX_ENTRIES:
                raise AdapterRejected(f"adapter {name!r}: its directory holds more than {MAX_ENTRIES} entries; "
                                      "expected an adapter's few files")
            st = os.stat(entry.name, dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                raise AdapterRejected(f"adapter {name!r}: file {entry.name} is a symbolic link, refused so that "
                                      "nothing links outside the adapter root; expected the adapter's own files")
            if stat.S_ISREG(st.st_mode):
                files.append(entry.name)
            elif not stat.S_ISDIR(st.st_mode):
                raise AdapterRejected(f"adapter {name!r}: {entry.name} is not a regular file; expected the "
                                      "adapter's own files")
    return files


def _copy_file(dir_fd: int, file: str, dest: Path, name: str, max_bytes: int) -> None:
    try:
        fd = os.open(file, _FILE_FLAGS, dir_fd=dir_fd)
    except OSError as err:  # swapped for a link (ELOOP) or removed since it was listed
        raise AdapterRejected(f"adapter {name!r}: file {file} cannot be opened ({err.strerror}); expected a "
                              "regular file that is not a link") from None
    with os.fdopen(fd, "rb") as src:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise AdapterRejected(f"adapter {name!r}: {file} is not a regular file; expected the adapter's files")
        with open(dest, "xb") as out:
            copied = 0
            while chunk := src.read(_CHUNK):
                copied += len(chunk)
                if copied > max_bytes:
                    raise AdapterRejected(f"adapter {name!r}: file {file} has more than {max_bytes} bytes; "
                                          "expected a small adapter (weights smaller than the base model)")
                out.write(chunk)
