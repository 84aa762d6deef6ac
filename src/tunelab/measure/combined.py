"""`tunelab compare --combine METHOD`: the quality of one adapter combined from the compared strategies, against
its parts.

After a comparison, the strategies that finished with a plain LoRA artifact (lora, qlora, and lora with other
options) are combined with equal weights (1/n each; ties, dare and magnitude_prune keep density 0.5) by
`tunelab combine`, into `<output>/combined/<METHOD>/`. Each part and the combination are then scored with the same
evaluation (`evaluate_spec`: the embedded data's validation split, or a data file's first rows), and the figures
go to `<output>/combined.json`:

    {"combination": "svd", "parts": {"lora": 2.31, "qlora": 2.35}, "combined_loss": 2.33,
     "best_part": "lora", "combined_minus_best": 0.02, "adapter": ".../combined/svd"}

Fewer than two such strategies, or adapters that cannot be combined (the refusal's one line), are recorded as
`"skipped"` with the reason; the comparison itself is never affected.
"""

from __future__ import annotations

from pathlib import Path

from tunelab.artifacts import inspect
from tunelab.artifacts.combine import ALIASES, combine
from tunelab.artifacts.combine_math import COMBINATIONS, PRUNED
from tunelab.errors import ConfigError, TunelabError, closest
from tunelab.evaluation import evaluate_spec
from tunelab.jsonio import write_json_atomic

DENSITY = 0.5


def check_combination(name: str) -> str:
    """The combination's canonical name; a one-line error naming `--combine` for an unknown one."""
    canonical = ALIASES.get(name, name)
    if canonical not in COMBINATIONS:
        raise ConfigError(f"--combine {name!r}: unknown{closest(name, COMBINATIONS)}; expected one of "
                          f"{', '.join(COMBINATIONS)}")
    return canonical


def lora_parts(out_dir: Path, names: list[str]) -> dict[str, Path]:
    """Strategy name -> artifact dir, for the strategies in `names` whose artifact is a plain LoRA adapter."""
    parts = {}
    for name in names:
        artifact = out_dir / "runs" / name / "artifact"
        try:
            info = inspect(artifact)
        except TunelabError:
            continue  # failed or not run: no artifact
        if info.kind == "adapter" and info.files_method == "lora":
            parts[name] = artifact
    return parts


def combined_quality(out_dir: str | Path, names: list[str], combination: str, *, model: str, data: str,
                     seq_len: int, batch_size: int, max_examples: int | None) -> dict:
    """Combine the plain-LoRA strategies among `names` and score the combination against its parts.

    Returns (and writes to `<out_dir>/combined.json`) the record described in the module docstring.
    """
    out_dir = Path(out_dir)
    combination = check_combination(combination)
    parts = lora_parts(out_dir, names)
    record: dict = {"combination": combination, "parts": {}}
    if len(parts) < 2:
        record["skipped"] = (f"needs two or more finished plain-LoRA strategies; found {sorted(parts) or 'none'} "
                             f"(compare lora, qlora or lora with other --set-for options)")
        write_json_atomic(out_dir / "combined.json", record)
        return record
    target = out_dir / "combined" / combination
    try:
        combine(list(parts.values()), target, combination, weights=[1 / len(parts)] * len(parts),
                density=DENSITY if combination in PRUNED else None)
    except TunelabError as e:
        record["skipped"] = str(e)
        write_json_atomic(out_dir / "combined.json", record)
        return record
    score = {"seq_len": seq_len, "batch_size": batch_size, "max_examples": max_examples}
    for name, artifact in parts.items():
        record["parts"][name] = evaluate_spec(model, data, adapter=artifact, **score)["loss"]
    record["combined_loss"] = evaluate_spec(model, data, adapter=target, **score)["loss"]
    record["best_part"] = min(record["parts"], key=record["parts"].get)
    record["combined_minus_best"] = record["combined_loss"] - record["parts"][record["best_part"]]
    record["adapter"] = str(target)
    write_json_atomic(out_dir / "combined.json", record)
    return record
