"""Run the tunelab CLI and SIGKILL it at a chosen point, to leave the files a real `kill -9` would leave.

    KILL_AT=POINT python kill_at.py ARGV...

POINT is one of:
- `moved-aside:NAME`: right after a rename whose source is named NAME (the first half of a swap);
- `saved-model`: right after a model's `save_pretrained` returns (a merge's temp dir written, not yet renamed).
"""

from __future__ import annotations

import os
import signal
import sys


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(point: str) -> None:
    kind, _, name = point.partition(":")
    if kind == "moved-aside":
        real_rename = os.rename

        def rename(src, dst, *args, **kwargs):
            real_rename(src, dst, *args, **kwargs)
            if os.path.basename(os.fspath(src)) == name:
                _die()

        os.rename = rename
    elif kind == "saved-model":
        from transformers import PreTrainedModel

        real_save = PreTrainedModel.save_pretrained

        def save_pretrained(self, *args, **kwargs):
            real_save(self, *args, **kwargs)
            _die()

        PreTrainedModel.save_pretrained = save_pretrained
    else:
        raise SystemExit(f"unknown KILL_AT point {point!r}")


if __name__ == "__main__":
    install(os.environ["KILL_AT"])
    from tunelab.cli import main

    sys.exit(main(sys.argv[1:]))
