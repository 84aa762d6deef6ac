"""Run the tunelab CLI with the model load slowed down, so a test can aim a signal at it.

    python slow_load.py ARGV...

Prints `LOADING` (flushed) when a model load starts, then sleeps `SLOW_LOAD_SECONDS` (default 60) before
loading. Everything else is the real CLI.
"""

from __future__ import annotations

import os
import sys
import time

import tunelab.models as models

_real_load = models.load_model


def _slow_load(*args, **kwargs):
    print("LOADING", flush=True)
    time.sleep(float(os.environ.get("SLOW_LOAD_SECONDS", "60")))
    return _real_load(*args, **kwargs)


models.load_model = _slow_load

if __name__ == "__main__":
    from tunelab.cli import main

    sys.exit(main(sys.argv[1:]))
