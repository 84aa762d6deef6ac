"""The validated run configuration: one pydantic model, built from a YAML file, CLI flags and `--set` pairs.

Unknown keys are errors that suggest the closest valid key. Values that cannot work (r <= 0, a negative
learning rate, seq_len <= 0, an unknown method or task) fail here, before any model loads.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tunelab.data.templates import resolve_chat_template
from tunelab.errors import ConfigError, closest
from tunelab.methods import get_method
from tunelab.methods.tokens import check_method
from tunelab.tracking import parse_report_to
from tunelab.validation import check_keys, parse_model
from tunelab.yamlio import load_no_alias

Task = Literal["causal-lm", "classification"]

# Keys whose change alters the result of a run: a resume with any of them different is refused.
RESULT_KEYS = (
    "model", "data", "task", "method", "method_options", "seed", "batch_size", "grad_accum", "lr",
    "weight_decay", "schedule", "warmup_steps", "max_steps", "epochs", "seq_len", "packing", "max_grad_norm",
    "val_fraction", "truncation", "adam_betas", "adam_eps", "columns", "chat_template", "packing_mask",
    "add_tokens", "master_weights",
)
# the column names `columns` may map to (every format's, LLaMA-Factory's Alpaca and ShareGPT included)
DATA_COLUMNS = ("text", "label", "prompt", "response", "messages", "instruction", "input", "output", "system",
                "history", "conversations")


class RunConfig(BaseModel):
    """Everything a training run needs. Defaults give a short LoRA run on the embedded default model and data."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    model: str = "smollm2-135m"
    data: str = "default"
    task: Task = "causal-lm"
    method: str = "lora"
    method_options: dict[str, Any] = Field(default_factory=dict)
    adapter_name: str = "default"
    output: str = "runs/latest"
    seed: int = 0
    max_steps: int | None = Field(default=None, gt=0)
    epochs: float = Field(default=1.0, gt=0)
    batch_size: int = Field(default=8, gt=0)
    grad_accum: int = Field(default=1, gt=0)
    lr: float | None = Field(default=None, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(default=0, ge=0)
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = Field(default=1e-8, gt=0)
    seq_len: int = Field(default=256, gt=0)
    packing: bool = False
    # with packing: "document" keeps attention and prediction inside each document, "none" lets a chunk's
    # tokens see the documents before them; unset: "document" where the method allows it (docs/data.md)
    packing_mask: Literal["document", "none"] | None = None
    truncation: Literal["truncate", "drop"] = "truncate"
    val_fraction: float = Field(default=0.1, ge=0, lt=1)
    columns: dict[str, str] | None = None  # tunelab's column name -> the data file's (`prompt: question`)
    chat_template: str | None = None  # a shipped template name (chatml, alpaca) or a Jinja file
    report_to: list[str] = Field(default_factory=list)  # trackers beside metrics.jsonl: tensorboard, wandb
    add_tokens: list[str] | None = None  # new special tokens: the tokenizer grows, their rows train (methods/tokens)
    eval_every: int | None = Field(default=None, gt=0)
    eval_batches: int | None = Field(default=None, gt=0)
    log_every: int = Field(default=1, gt=0)
    save_every: int | None = Field(default=None, gt=0)
    keep_last: int | None = Field(default=None, gt=0)
    gradient_checkpointing: bool = False
    checkpoint_every: int = Field(default=1, gt=0)  # with gradient_checkpointing: recompute every n-th block only
    offload_activations: bool = False  # with gradient_checkpointing, CUDA: checkpointed inputs wait in host memory
    # speed switches (docs/gpu.md); off, or where one cannot apply, the plain PyTorch path runs
    adapter_autocast: bool = True  # under autocast, adapters read the bf16 activations as they are (no fp32 copy)
    fused_loss: bool = True  # causal-lm: output head + cross-entropy chunked over tokens, never full logits
    liger_kernels: bool = True  # CUDA, liger-kernel installed: its RMSNorm, SwiGLU, RoPE (and fused loss kernel)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # mixed precision with fp32 master weights: parameters that train in a 16-bit dtype (full fine-tuning of a bf16
    # model) are updated through fp32 copies (train/optim.py), so small updates do not round away; off: bf16 AdamW
    master_weights: bool = True
    device: str = "auto"
    trust_remote_code: bool = False
    nan_policy: Literal["stop", "skip"] = "stop"
    # under torchrun (docs: README "Several GPUs"): how the model is spread over the ranks, and how long a
    # collective may wait for a rank before the run stops
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    # FSDP2: whether each block frees its gathered weights after the forward (gathered again for the backward);
    # auto keeps them when the whole model in the compute dtype takes at most 15% of the GPU (train/distributed.py)
    reshard_after_forward: Literal["auto", "always", "never"] = "auto"
    dist_timeout: float = Field(default=600.0, gt=0)
    resume: bool = False
    force: bool = False  # resume even though a result-affecting key changed
    overwrite: bool = False  # replace an earlier run's outputs (its checkpoints, run.json) by this fresh run's

    @model_validator(mode="after")
    def _method_known(self) -> "RunConfig":
        method = get_method(self.method)
        if self.add_tokens:
            if self.task != "causal-lm":
                raise ValueError("add_tokens applies to causal-lm runs only")
            check_method(method)
        return self

    @model_validator(mode="after")
    def _checkpointing_options(self) -> "RunConfig":
        for key, value, default in (("checkpoint_every", self.checkpoint_every, 1),
                                    ("offload_activations", self.offload_activations, False)):
            if value != default and not self.gradient_checkpointing:
                raise ValueError(f"{key}: applies with gradient_checkpointing only; set gradient_checkpointing: "
                                 f"true (--gradient-checkpointing) or leave {key} at {default}")
        if self.packing and self.packing_mask == "document":
            self.documents_packed()  # a method with virtual tokens refuses it here, before anything is written
        return self

    @field_validator("add_tokens")
    @classmethod
    def _distinct_tokens(cls, v: list[str] | None) -> list[str] | None:
        for i, token in enumerate(v or []):
            if not token.strip() or token in v[:i]:
                raise ValueError(f"entry {i} ({token!r}): expected distinct, non-blank tokens")
        return v or None

    @field_validator("columns")
    @classmethod
    def _known_columns(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        for key in v or {}:
            if key not in DATA_COLUMNS:
                raise ValueError(f"unknown column {key!r}{closest(key, DATA_COLUMNS)}; expected one of "
                                 f"{', '.join(DATA_COLUMNS)}")
        return v

    @field_validator("report_to", mode="before")
    @classmethod
    def _known_trackers(cls, v):
        try:
            return parse_report_to(v)
        except ConfigError as e:
            raise ValueError(str(e).removeprefix("report_to: ")) from None

    def method_opts(self, where: str = "--set"):
        """The method's validated options object (`--set` values; `where` names their source in errors)."""
        method = get_method(self.method)
        return parse_model(method.Options, self.method_options, where=f"{where} for method '{self.method}'")

    def documents_packed(self) -> bool:
        """Whether packed chunks keep attention and prediction inside each document (`packing_mask`)."""
        if not self.packing or self.packing_mask == "none":
            return False
        allowed = get_method(self.method).document_packing
        if self.packing_mask == "document" and not allowed:
            raise ConfigError(f"packing_mask: document does not apply to method '{self.method}' (its virtual "
                              "tokens change the positions and the mask); set packing_mask: none")
        return allowed

    def result_hash(self) -> str:
        """A short hash of the keys that change a run's result (a resume checks it)."""
        payload = self.result_values()
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def result_values(self) -> dict[str, Any]:
        """The result-affecting keys and their values, JSON-ready."""
        values = {k: getattr(self, k) for k in RESULT_KEYS}
        # keys that mean nothing at their default are left out, so runs from before they existed resume as they were
        if not self.packing:
            values.pop("packing_mask")
        if not self.add_tokens:
            values.pop("add_tokens")
        return json.loads(json.dumps(values, default=str))


def parse_set(pairs: list[str] | None) -> dict[str, Any]:
    """Parse `--set key=value` pairs; values are YAML scalars or lists (`true`, `16`, `[q_proj,v_proj]`)."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {pair!r}: expected key=value")
        try:
            out[key.strip()] = load_no_alias(raw, f"--set {key.strip()}") if raw.strip() else ""
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out


def parse_columns(text: str | None) -> dict[str, str] | None:
    """Parse `--columns prompt=question,response=answer` (tunelab's name = the data file's column)."""
    if text is None:
        return None
    out: dict[str, str] = {}
    for pair in text.split(","):
        ours, sep, theirs = (part.strip() for part in pair.partition("="))
        if not (sep and ours and theirs):
            raise ConfigError(f"--columns {text!r}: expected name=column pairs separated by commas "
                              f"(e.g. prompt=question,response=answer)")
        out[ours] = theirs
    return out


def parse_tokens(values: list[str] | None) -> list[str] | None:
    """`--add-tokens` values: each a file (one token per line, blank lines skipped) or comma-separated tokens."""
    out: list[str] = []
    for value in values or []:
        path = Path(value)
        if path.is_file():
            try:
                out += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError(f"--add-tokens {path}: cannot read it as UTF-8 text ({e})") from None
        else:
            out += [t.strip() for t in value.split(",") if t.strip()]
    return out or None


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a run config YAML file into a dict; errors name the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found" if not p.exists() else f"{p}: is a directory, expected a YAML file")
    try:
        data = load_no_alias(p.read_text(), str(p)) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{p}{line}: not valid YAML") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of config keys, found {type(data).__name__}")
    return data


def build_config(file_values: dict[str, Any], overrides: dict[str, Any], where: str = "config") -> RunConfig:
    """Merge config-file values with CLI overrides (non-None wins) and validate, options included.

    `method_options` merge key by key (`--set` values in `overrides` win over the file's). Errors name `where`
    (the config file, when there is one) for the file's keys and `--set` for the flags' own.
    """
    values = {**file_values, **{k: v for k, v in overrides.items() if v is not None}}
    from_file, from_flags = file_values.get("method_options"), overrides.get("method_options")
    if isinstance(from_file, dict) and isinstance(from_flags, dict):
        values["method_options"] = {**from_file, **from_flags}
    cfg = parse_model(RunConfig, values, where=where)
    source = "--set"
    if isinstance(from_file, dict) and from_file:
        check_keys(get_method(cfg.method).Options, from_file, f"{where}: method_options for method '{cfg.method}'")
        source = f"{where}: method_options" + (" or --set" if from_flags else "")
    cfg.method_opts(source)  # validate the method's options now, before any model loads
    if cfg.chat_template is not None:
        resolve_chat_template(cfg.chat_template)  # a missing template file fails before the model loads
    return cfg
