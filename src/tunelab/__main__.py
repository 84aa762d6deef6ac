"""`python -m tunelab ...`: the CLI (what `torchrun -m tunelab train ...` starts on every rank)."""

import os
import sys

from tunelab.cli import main


def _exit(code: int) -> None:
    """Exit with `code`. A rank that still belongs to a process group (it stopped on an error, its own or a
    peer's) leaves without the interpreter's teardown: destroying the group's live communication threads
    there aborts the process (SIGABRT), which would replace the exit code its error line promised."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    _exit(main())
