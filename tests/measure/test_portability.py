"""Serving costs: the base an adapter needs is counted as the runs hold it."""

from __future__ import annotations


def test_the_served_base_counts_its_weights_in_the_dtype_the_runs_use(tiny_llama, tmp_path):
    import torch

    from tunelab.measure.compare_worker import served_bytes

    (tmp_path / "config.json").write_text("{}")
    weights = sum(t.numel() for t in {t.data_ptr(): t for t in tiny_llama.state_dict().values()}.values())
    assert served_bytes(tiny_llama, tmp_path) == 4 * weights + 2
    assert served_bytes(tiny_llama.to(torch.bfloat16), tmp_path) == 2 * weights + 2  # tied head counted once
