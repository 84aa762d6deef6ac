"""tunelab: adapt pre-trained transformers with any fine-tuning strategy, and measure the trade-offs."""

__version__ = "0.1.0"
