"""Run several training configs one after another on every rank of one torchrun launch (one launch, so the
distributed tests stay fast): `torchrun --nproc-per-node 2 dist_runner.py A.json B.json ...`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch


def main(paths: list[str]) -> int:
    torch.set_num_threads(1)
    from tunelab.config import RunConfig
    from tunelab.train import train

    for path in paths:
        train(RunConfig(**json.loads(Path(path).read_text())), progress=False)
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # as `python -m tunelab` under torchrun: no interpreter teardown of the live process group
