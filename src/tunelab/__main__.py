"""`python -m tunelab ...`: the CLI (what `torchrun -m tunelab train ...` starts on every rank)."""

import os
import sys

from tunelab.cli import main


def _exit(code: int) -> None:
    """Exit with `code`. A rank started by torchrun leaves without the interpreter's teardown, whether or not it
    still belongs to a process group: destroying the communication library's threads there can abort the
    process (SIGABRT, "terminate called without an active exception"), which would replace the exit code its
    error line promised, or fail a run that finished. Everything a run writes is fsynced before this point."""
    import torch.distributed as dist

    from tunelab.train.distributed import launched_by_torchrun

    if launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    _exit(main())
