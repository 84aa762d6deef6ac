"""Data pipeline: read JSONL/CSV/Parquet or the embedded data sets, encode by format, split, collate and pack.

`load_data` returns a `Dataset` of examples; `collate` makes padded batches; `epoch_order` gives the
deterministic sample order of each epoch.
"""

from tunelab.data.collate import collate, epoch_order, forward_inputs, pack
from tunelab.data.formats import IGNORE_INDEX
from tunelab.data.load import Dataset, load_data

__all__ = ["IGNORE_INDEX", "Dataset", "collate", "epoch_order", "forward_inputs", "load_data", "pack"]
