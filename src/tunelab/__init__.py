"""tunelab: adapt pre-trained transformers with any fine-tuning strategy, and measure the trade-offs."""

import logging as _logging

__version__ = "0.1.0"

# transformers imports torchao (the NF4 base of qlora) whenever it is installed; on a CPU-only machine its
# optional CUDA extensions fail to load and it logs that at import, with a deprecation notice from torch's
# pytree. Neither affects tunelab, so keep them out of the user's terminal.
for _name in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
