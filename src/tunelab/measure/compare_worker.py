"""The worker of `tunelab compare`: one job in a fresh interpreter, so no memory figure leaks between strategies.

    python -m tunelab.measure.compare_worker KIND JOB RESULT

KIND is `baseline` (load the base model and the data, score the untouched model on the validation batches and
the reference prose, or a classifier's forgetting probe; tell which compared methods cannot apply to the model),
`strategy` (train one run of a strategy, then load what it wrote, timing the attach or load, and score it on the
same reference prose or probe) or `lr_search` (train a strategy at each lr of its search). JOB is the JSON the parent wrote; RESULT is
where this worker writes its result JSON.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

from tunelab.artifacts import artifact_bytes
from tunelab.config import RunConfig
from tunelab.errors import ConfigError, TunelabError
from tunelab.jsonio import read_json_object, write_json_atomic
from tunelab.measure.forgetting import (load_examples, reference_examples, save_examples, score_reference,
                                        target_tokens)
from tunelab.measure.portability import load_trained
from tunelab.measure.probe import is_probe, probe_accuracy, probe_examples, save_probe
from tunelab.measure.tensor_peak import tensor_peak_bytes
from tunelab.methods import get_method
from tunelab.methods.bitfit import has_bias_terms
from tunelab.train import rng, train
from tunelab.train.evaluate import evaluate
from tunelab.train.setup import load_model_and_data
from tunelab.train.summary import finite_or_none
from tunelab.interrupts import die_with_parent


def worker_main(argv: list[str] | None = None) -> int:
    """Run one job in this fresh interpreter and write its result JSON; exit 0 when it succeeded.

    KIND is `baseline` (score the base model on the reference prose, check the data) or `strategy` (train one
    strategy, then measure forgetting and attach time on what it wrote). Errors are written to the result, with
    `user_error` true for bad input (a `TunelabError`), and the traceback goes to the log.
    """
    die_with_parent()  # a compare killed with -9 takes its worker with it
    kind, job_path, result_path = argv if argv is not None else sys.argv[1:]
    job = read_json_object(job_path, ConfigError)
    try:
        result = {"baseline": _baseline_worker, "strategy": _strategy_worker, "lr_search": _lr_search_worker}[kind](job)
    except Exception as e:  # recorded, not raised: one failing strategy must not stop the others

        traceback.print_exc()
        result = {"status": "failed", "error": _error_line(e), "user_error": isinstance(e, TunelabError)}
    if "rank" in result:  # a rank other than 0 of a torchrun launch (`compare --nproc`): rank 0 reports
        return 0 if result["status"] == "ok" else 1
    write_json_atomic(Path(result_path), result)  # the parent reads it only after this process exits
    return 0 if result["status"] == "ok" else 1


def _error_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return text if isinstance(e, TunelabError) else f"{type(e).__name__}: {text}"[:500]


def served_bytes(model, path) -> int:
    """`model`'s weights in the dtype it was loaded in (tied weights once), plus the files of its dir that are not
    weights (config, tokenizer): what saving it as a run does would take."""
    seen, weights = set(), 0
    for t in model.state_dict().values():  # parameters and persistent buffers
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            weights += t.numel() * t.element_size()
    others = sum(f.stat().st_size for f in Path(path).rglob("*")
                 if f.is_file() and f.suffix not in (".safetensors", ".bin", ".pt", ".gguf"))
    return weights + others


def _baseline_worker(job: dict) -> dict:
    """The untouched model: its size, its figures on the runs' validation batches, the reference prose (or the
    forgetting probe of a classifier), and which of the compared methods cannot apply to it, and why."""
    cfg = RunConfig(**job["run"])
    rng.seed_everything(cfg.seed)  # a classification head is fresh: the same one in every baseline
    loaded, dataset = load_model_and_data(cfg)  # bad model or data stops the compare here
    result = {"status": "ok", "model_path": str(loaded.path), "base_bytes": artifact_bytes(loaded.path),
              "served_bytes": served_bytes(loaded.model, loaded.path),
              "bias_terms": has_bias_terms(loaded.model), "train_examples": len(dataset.train),
              "train_tokens": sum(len(ex["input_ids"]) for ex in dataset.train)}
    if dataset.val:
        scores = evaluate(loaded.model, dataset.val, cfg.task, loaded.pad_id, cfg.batch_size,
                          max_batches=cfg.eval_batches)
        result.update(val_loss=finite_or_none(scores["loss"]),
                      val_perplexity=finite_or_none(scores.get("perplexity")),
                      val_accuracy=finite_or_none(scores.get("accuracy")))
    if cfg.task == "causal-lm":
        examples = reference_examples(job["reference_data"], loaded.tokenizer, cfg.seq_len,
                                      job["reference_sequences"])
        save_examples(examples, Path(job["reference_file"]))
        result.update(reference_perplexity=score_reference(loaded, examples, cfg.batch_size),
                      reference_sequences=len(examples), reference_tokens=target_tokens(examples))
    else:  # a classifier: the linear probe on a general labelled task (tunelab.measure.probe)
        probe = probe_examples(job["reference_data"], loaded.tokenizer, cfg.seq_len)
        save_probe(probe, Path(job["reference_file"]))
        result.update(probe_accuracy=probe_accuracy(loaded.model, probe, loaded.pad_id, cfg.batch_size),
                      probe_train_examples=len(probe["train"]), probe_test_examples=len(probe["test"]),
                      probe_classes=len(probe["labels"]))
    result["not_applicable"] = {name: why for name in job.get("methods", [])
                                if (why := get_method(name).not_applicable(loaded.model))}
    return result


def _strategy_worker(job: dict) -> dict:
    """Train one run; then (first seed, CPU) its tensor peak; then attach time and forgetting on what it wrote."""
    cfg = RunConfig(**job["run"])
    summary = train(cfg, progress=False)
    if "rank" in summary:  # not rank 0 of `compare --nproc`: its part of the training is done
        return {"status": "ok" if summary.get("status") == "completed" else "failed", "rank": summary["rank"]}
    if summary.get("status") != "completed":
        return {"status": "failed", "error": summary.get("message", f"training ended {summary.get('status')}")}
    result: dict = {"status": "ok", "notes": []}
    if job.get("tensor_peak") and "cuda" not in summary.get("peak_memory_source", ""):
        try:  # after training: its RSS figures are already taken
            result["tensor_peak_bytes"] = tensor_peak_bytes(cfg)
        except Exception as e:
            result["notes"].append(f"tensor peak not measured: {_error_line(e)}")
    try:
        loaded, timing = load_trained(cfg, job["artifact"])
        result.update(timing)
    except Exception as e:  # training succeeded; keep its figures and say what is missing
        result["notes"].append(f"attach time and forgetting not measured: {_error_line(e)}")
        return result
    if job.get("reference_file"):
        try:
            reference = load_examples(job["reference_file"])
            if is_probe(reference):
                result["after_accuracy"] = probe_accuracy(loaded.model, reference, loaded.pad_id, cfg.batch_size)
            else:
                result["after_perplexity"] = score_reference(loaded, reference, cfg.batch_size)
        except Exception as e:
            result["notes"].append(f"forgetting not measured: {_error_line(e)}")
    return result


def _lr_search_worker(job: dict) -> dict:
    """Train each run of the search in turn; a failing lr is recorded and the others still train."""
    points, prints = [], None
    for run in job["runs"]:
        cfg = RunConfig(**run)
        try:
            summary = train(cfg, progress=False)
            prints = prints or summary.get("fingerprints")
            loss = summary.get("final_val_loss")
            points.append({"lr": cfg.lr, "val_loss": loss,
                           "error": None if loss is not None else "no validation loss (diverged or no val split)"})
        except Exception as e:
            traceback.print_exc()
            points.append({"lr": cfg.lr, "val_loss": None, "error": _error_line(e)})
    return {"status": "ok", "points": points, "fingerprints": prints}


if __name__ == "__main__":
    sys.exit(worker_main())
