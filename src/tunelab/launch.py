"""`tunelab train --nproc N`: torchrun (`torch.distributed.run`), standalone on this machine, running
`python -m tunelab train ...` on N processes. Nothing is launched by tunelab itself: rendezvous, worker
monitoring and teardown are torchrun's. Several machines: call `torchrun` directly (README, "Several GPUs").

torchrun's agent stops every rank when one fails; here its log lines are kept quiet and the outcome is one
line, as for any tunelab error: the failing rank prints its own (`error: rank R: ...`), and a rank killed by a
signal is named here.
"""

from __future__ import annotations

import logging
import signal
import sys


def torchrun_argv(nproc: int, argv: list[str]) -> list[str]:
    """torchrun's arguments for `tunelab ARGV` on `nproc` local processes, `--nproc` removed from ARGV."""
    rest, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            rest.append(arg)
    return ["--standalone", "--nproc-per-node", str(nproc), "-m", "tunelab", *rest]


def _cause(error) -> tuple[int, object]:
    """The rank whose failure stopped the run.

    torchrun's agent records the failures of one poll, then SIGTERMs the ranks still running and records those
    too (its own bookkeeping), so a SIGTERM is the agent's unless nothing else failed. In order: a rank killed
    by a signal other than SIGTERM; one that exited with a code other than 1; one that exited with 1 (a crash,
    which prints its own traceback, or a rank stopped because a peer failed); then the first recorded. Ranks
    that leave at once after a peer's failure can be seen in the same poll as the failing rank, and first.
    """
    failures = list(error.failures.items())  # in the order the agent recorded them
    sigterm = -int(signal.SIGTERM)
    for wanted in (lambda f: f.exitcode < 0 and f.exitcode != sigterm,
                   lambda f: f.exitcode not in (1, sigterm),
                   lambda f: f.exitcode == 1):
        for rank, failure in failures:
            if wanted(failure):
                return rank, failure
    return failures[0]


def run_torchrun(nproc: int, argv: list[str]) -> int:
    """Run torchrun on `tunelab ARGV` with `nproc` processes; returns the exit code to leave with."""
    import os

    os.environ.setdefault("LOGLEVEL", "CRITICAL")  # torch.distributed.elastic's loggers read it when created
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    for name in ("torch.distributed", "torch.distributed.elastic", "torch.distributed.run"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        torchrun.run(torchrun.parse_args(torchrun_argv(nproc, argv)))
    except ChildFailedError as e:
        rank, failure = _cause(e)
        if failure.exitcode < 0:
            name = signal.Signals(-failure.exitcode).name
            print(f"error: rank {rank} was killed by {name}; the other ranks were stopped; resume from the last "
                  f"complete checkpoint with --resume", file=sys.stderr)
            return 1
        return failure.exitcode
    except SignalException as e:  # the launcher was signalled: torchrun passed it on to every rank
        return 0 if e.sigval == signal.SIGTERM else 128 + int(e.sigval)
    return 0
