"""What an artifact dir holds, read from its files alone: the one answer for merge, eval, serve and load.

`inspect(dir)` reads `adapter_config.json` (an adapter) or `config.json` (a whole model) and tunelab's sidecar
(`tunelab.json`), never the weights, and returns an `ArtifactInfo`. The method is the one `load_adapter` injects:
for an adapter, among the methods of its `peft_type` the one the sidecar names, else the first whose
`matches_config` is true (`method_for_config`); for a whole-model dir, the whole-model method.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tunelab.artifacts.files import read_json, read_sidecar
from tunelab.artifacts.hf_model import CONFIG as MODEL_CONFIG, whole_model_method
from tunelab.artifacts.peft_format import CONFIG as ADAPTER_CONFIG, method_for_config
from tunelab.artifacts.recovery import recover
from tunelab.errors import ArtifactError

TASKS = {"SEQ_CLS": "classification", "CAUSAL_LM": "causal-lm"}  # PEFT's task_type -> tunelab's task


@dataclass(frozen=True)
class ArtifactInfo:
    """The facts of one artifact dir.

    - `kind`: "adapter" (adapter_config.json) or "model" (an HF model dir);
    - `method`: the registered method that loads it (what wrote it, when tunelab's sidecar says so);
    - `files_method`: the method its files alone select (no sidecar): what HF PEFT and other tools load it as.
      It differs from `method` for a method whose artifact is portable but whose own loading changes the base
      (qlora: a plain LoRA, loaded by tunelab on an NF4-quantised base);
    - `peft_type`, `rank` (largest LoRA-family rank, None without one), `base_model` (the sidecar's
      `base_model`, the base as given to tunelab, e.g. an alias; else `base_model_name_or_path`; None when not
      recorded), `task` ("causal-lm", "classification" or None when
      not recorded, read as causal-lm), `task_type` (PEFT's string as written), `label_names`;
    - `config`: the adapter_config.json content ({} for a whole model).
    """

    path: Path
    kind: str
    method: str
    files_method: str
    peft_type: str | None
    task_type: str | None
    label_names: list[str] | None
    rank: int | None
    base_model: str | None
    config: dict

    @property
    def task(self) -> str:
        """tunelab's task: classification for PEFT's SEQ_CLS (or recorded labels), causal-lm otherwise."""
        return "classification" if self.task_type == "SEQ_CLS" else "causal-lm"


def check_adapter_dir(adapter_dir: str | Path) -> Path:
    """`adapter_dir` as a Path; `ArtifactError` naming it when it is missing or a file.

    A replacement of it that a killed run left half-done is finished or rolled back first (one line logged).
    """
    path = Path(adapter_dir)
    recover(path.parent, path.name)
    if not path.is_dir():
        raise ArtifactError(f"{path}: adapter directory not found" if not path.exists()
                            else f"{path}: is a file, expected an adapter directory")
    return path


def inspect(artifact_dir: str | Path) -> ArtifactInfo:
    """Read what `artifact_dir` holds (see the module docstring); weights are not read.

    Raises `ArtifactError` naming the dir or file when it is missing, holds neither config, or its config is
    not JSON, lacks `peft_type` or names one that no registered method reads.
    """
    path = check_adapter_dir(artifact_dir)
    side = read_sidecar(path)
    labels = side.get("label_names") or None
    if (path / ADAPTER_CONFIG).exists():
        config = read_json(path / ADAPTER_CONFIG)
        method = method_for_config(config, path / ADAPTER_CONFIG, side.get("method"))
        try:
            files_method = method_for_config(config, path / ADAPTER_CONFIG).name
        except ArtifactError:  # a tunelab-only peft_type: only the sidecar names its reader
            files_method = method.name
        task_type = config.get("task_type") or side.get("task_type")
        base = side.get("base_model") or config.get("base_model_name_or_path")  # the alias the user gave wins
        return ArtifactInfo(path, "adapter", method.name, files_method, config["peft_type"], task_type,
                            labels, adapter_rank(config), str(base) if base else None, config)
    if (path / MODEL_CONFIG).exists():
        method = whole_model_method(path).name
        return ArtifactInfo(path, "model", method, method, None, side.get("task_type"), labels, None, None, {})
    raise ArtifactError(f"{path}: neither {ADAPTER_CONFIG} nor {MODEL_CONFIG} found")


def adapter_rank(config: dict) -> int | None:
    """The largest LoRA-family rank in the config (`r` and any per-module `rank_pattern`); None if it has none."""
    ranks = [config.get("r"), *(config.get("rank_pattern") or {}).values()]
    ranks = [r for r in ranks if isinstance(r, int) and not isinstance(r, bool)]
    return max(ranks) if ranks else None
