"""The allocator's tensor peak of a training step on CPU: the quantity `tunelab plan` predicts.

On a GPU the run's peak is `torch.cuda.max_memory_allocated`, already the tensor peak. On CPU the OS peak RSS
also holds the interpreter, libraries, allocator caches and freed pages not yet returned, so it cannot be set
against the plan. Here the run's model is built as the run builds it (`tunelab.train.setup.build_run`), and two
training steps of the loop's own code (`accumulate_window`, AdamW step, `zero_grad(set_to_none=True)`) run on
full batch x seq_len batches under `torch.profiler`'s memory events: the peak of the allocator's running total
plus the weights already resident is the tensor peak (bench/plan_vs_measured.py measures the same way).
"""

from __future__ import annotations

import torch

STEPS = 2  # the optimizer state is allocated in the first step; the second shows the steady peak


def _batch(cfg, vocab: int, n_labels: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Full-length random batch (batch_size, seq_len): the shape the plan predicts for."""
    ids = torch.randint(0, vocab, (cfg.batch_size, cfg.seq_len), generator=generator)
    labels = torch.randint(0, max(n_labels, 1), (cfg.batch_size,), generator=generator) \
        if cfg.task == "classification" else ids.clone()
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def tensor_peak_bytes(cfg) -> int:
    """Weights + the CPU allocator's peak over `STEPS` training steps of the run `cfg` describes (bytes)."""
    from torch.profiler import ProfilerActivity, profile

    from tunelab.measure.plan_model import storage_bytes
    from tunelab.train.loop import accumulate_window
    from tunelab.train.setup import build_run

    run = build_run(cfg)
    model = run.model.train()
    generator = torch.Generator().manual_seed(cfg.seed)
    vocab = int(getattr(model.config, "vocab_size", 0) or len(run.loaded.tokenizer))
    n_labels = len(run.dataset.label_names or [])
    weights = storage_bytes(model)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(STEPS):
            accumulate_window(model, [_batch(cfg, vocab, n_labels, generator)], cfg.task, fused=cfg.fused_loss)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
    running = peak = 0
    for event in sorted(prof.profiler.kineto_results.events(), key=lambda e: e.start_ns()):
        if event.name() == "[memory]":
            running += event.nbytes()
            peak = max(peak, running)
    return weights + peak
