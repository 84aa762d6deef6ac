"""The model a memory plan is for: its config, read without weights, and an exact inventory of its parameters.

`describe_model` accepts a local HF model dir, a `config.json` path, a packaged alias, a config dict or a
`PretrainedConfig`. It builds the model on the `meta` device (`torch.device("meta")` +
`AutoModelFor*.from_config`): every parameter has its real shape and no storage, so an 8B or 70B model is
counted exactly, for any architecture transformers knows, in seconds and without memory.

Each linear layer is assigned an input *site* of its transformer block. Linears at one site read the same
input tensor, so when any of them keeps its input for the weight gradient the tensor is stored once:
- `attn_in`: the attention input (q/k/v projections, GPT-2's fused `c_attn`, BERT's query/key/value);
- `attn_out`: the attention output read by the output projection (`o_proj`, `attn.c_proj`, BERT's
  `attention.output.dense`);
- `mlp_in`: the MLP input (`gate_proj`/`up_proj`, `c_fc`, `intermediate.dense`);
- `mlp_mid`: the MLP's inner activation read by the down projection (`down_proj`, `mlp.c_proj`, `output.dense`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, PretrainedConfig
from transformers.utils import logging as hf_logging

from tunelab.defaults import resolve_alias
from tunelab.errors import ArtifactError, ConfigError
from tunelab.jsonio import read_json_object
from tunelab.methods.base import output_head_names
from tunelab.modules import in_out_features, linear_like, name_matches

# model_type -> the block family whose activation formulas apply (see plan_formulas).
ARCH_OF = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "smollm3": "llama",
           "gpt2": "gpt2", "bert": "bert", "roberta": "bert"}
ENCODERS = {"bert", "roberta"}  # tunelab trains these for classification
REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
REQUIRED_BY_ARCH = {"llama": ("intermediate_size",), "bert": ("intermediate_size",)}

# Leaf-name suffixes of the linears at each input site; the longest suffix wins ("attention.output.dense"
# before "output.dense").
SITE_SUFFIXES = {
    "attn_in": ("q_proj", "k_proj", "v_proj", "c_attn", "query", "key", "value", "qkv_proj", "query_key_value"),
    "attn_out": ("o_proj", "attn.c_proj", "attention.output.dense", "out_proj"),
    "mlp_in": ("gate_proj", "up_proj", "c_fc", "intermediate.dense", "fc1", "gate_up_proj"),
    "mlp_mid": ("down_proj", "mlp.c_proj", "output.dense", "fc2", "dense_4h_to_h"),
}
HEAD_LEAVES = ("classifier", "score")  # classification heads, trained with every method (tunelab.methods.heads)


@dataclass(frozen=True)
class Linear:
    """One linear layer of the model: qualified name, (in, out) features, block input site, bias."""

    name: str
    in_features: int
    out_features: int
    site: str
    bias: bool


@dataclass
class ModelInfo:
    """What the planner knows about a model: config shapes plus the exact parameter inventory."""

    source: str
    model_type: str
    arch: str  # llama | gpt2 | bert | generic (the llama formulas, flagged approximate)
    task: str  # causal-lm | classification
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    num_labels: int
    tied: bool
    activation: str
    attn_dropout: float
    hidden_dropout: float
    embd_dropout: float
    params_total: int = 0
    max_param_numel: int = 0
    bias_params: int = 0
    norm_params: int = 0
    norm_count: int = 0
    head_params: int = 0  # the classification head (classifier/score), 0 for causal LMs
    linears: list[Linear] = field(default_factory=list)  # every linear except the output heads
    meta_model: nn.Module | None = field(default=None, repr=False)

    @property
    def kv_dim(self) -> int:
        """Key/value width: kv_heads * head_dim (smaller than hidden with grouped-query attention)."""
        return self.kv_heads * self.head_dim

    def site_dims(self) -> dict[str, int]:
        """Input width of each site in one block (from the first block's linears)."""
        dims: dict[str, int] = {}
        for lin in self.linears:
            if lin.site != "other":
                dims.setdefault(lin.site, lin.in_features)
        return dims


def load_config(spec: Any) -> tuple[Any, str]:
    """(PretrainedConfig, source description) for a dir, a config.json, an alias, a dict or a config object."""
    if isinstance(spec, PretrainedConfig):
        return spec, f"{spec.model_type} config"
    if isinstance(spec, dict):
        return _config_from_dict(dict(spec), "config dict"), "config dict"
    path = Path(str(spec)).expanduser()
    if not path.exists():
        path = _alias_or_missing(str(spec))
    cfg_file = path / "config.json" if path.is_dir() else path
    if not cfg_file.is_file():
        raise ArtifactError(f"{path}: no config.json in this model directory")
    return _config_from_dict(read_json_object(cfg_file, ConfigError), str(cfg_file)), str(spec)


def _alias_or_missing(spec: str) -> Path:
    """The model dir of a packaged alias; a path-like spec that does not exist is an `ArtifactError`."""
    if "/" in spec or "\\" in spec or spec.endswith(".json"):
        raise ArtifactError(f"{spec}: no such file or directory (expected a model dir, a config.json or an alias)")
    return Path(resolve_alias(spec))


def _config_from_dict(data: dict[str, Any], where: str):
    """Build the architecture's config class from raw keys, after checking the keys the planner needs."""
    model_type = data.get("model_type")
    if not isinstance(model_type, str):
        raise ConfigError(f"{where}: missing key 'model_type' (e.g. \"llama\", \"gpt2\", \"bert\")")
    try:
        with _quiet():
            config = AutoConfig.for_model(**data)
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{where}: key 'model_type' = {model_type!r} is not an architecture transformers "
                          f"knows ({str(e).splitlines()[0][:120]})") from None
    aliases = getattr(type(config), "attribute_map", {}) or {}
    for key in REQUIRED + REQUIRED_BY_ARCH.get(ARCH_OF.get(model_type, ""), ()):
        if key not in data and aliases.get(key) not in data:
            shown = aliases.get(key, key)
            raise ConfigError(f"{where}: missing key '{shown}', which the memory plan needs")
    return config


@contextlib.contextmanager
def _quiet():
    """Silence transformers' config and init chatter while the planner builds meta models."""
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            logging.disable(logging.WARNING)
            yield
    finally:
        logging.disable(logging.NOTSET)
        hf_logging.set_verbosity(level)


def infer_task(config) -> str:
    """classification for encoders and *ForSequenceClassification configs, causal-lm otherwise."""
    archs = getattr(config, "architectures", None) or []
    if config.model_type in ENCODERS or any(a.endswith("ForSequenceClassification") for a in archs):
        return "classification"
    return "causal-lm"


def build_meta_model(config, task: str) -> nn.Module:
    """The model of `config` on the meta device: real shapes, no storage, no initialisation cost."""
    auto = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    try:
        with _quiet(), torch.device("meta"):
            return auto.from_config(config)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"model_type {config.model_type!r}: transformers cannot build it for task {task} "
                          f"({str(e).splitlines()[0][:120]})") from None


def site_of(name: str) -> str:
    """The block input site of a linear, by the longest matching name suffix; "other" when none matches."""
    best, best_len = "other", 0
    for site, suffixes in SITE_SUFFIXES.items():
        for suffix in suffixes:
            if name_matches(name, (suffix,)) and len(suffix) > best_len:
                best, best_len = site, len(suffix)
    return best


def inventory(info: ModelInfo, model: nn.Module) -> None:
    """Fill `info`'s parameter counts and linear list from the meta model."""
    heads = output_head_names(model)
    params = list(model.parameters())  # tied weights appear once
    info.params_total = sum(p.numel() for p in params)
    info.max_param_numel = max((p.numel() for p in params), default=0)
    def in_head(name: str) -> bool:
        return any(name == h or name.startswith(h + ".") for h in heads)

    # biases outside the heads (the heads train as a separate copy under every adapter method)
    info.bias_params = sum(p.numel() for n, p in model.named_parameters() if n.endswith(".bias") and not in_head(n))
    norms = [m for m in model.modules() if "Norm" in type(m).__name__ and getattr(m, "weight", None) is not None]
    info.norm_count = len(norms)
    info.norm_params = sum(m.weight.numel() for m in norms)
    info.head_params = sum(p.numel() for n, m in model.named_modules()
                           if n.rsplit(".", 1)[-1] in HEAD_LEAVES for p in m.parameters())
    for name, module in model.named_modules():
        if name and linear_like(module) and not in_head(name):
            i, o = in_out_features(module)
            info.linears.append(Linear(name, i, o, site_of(name), getattr(module, "bias", None) is not None))
    info.meta_model = model


def _shapes(config, source: str, task: str) -> ModelInfo:
    """The config numbers the activation formulas use, under the names each architecture gives them."""
    model_type = config.model_type
    hidden, heads = config.hidden_size, config.num_attention_heads
    intermediate = (getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    act = getattr(config, "hidden_act", None) or getattr(config, "activation_function", None) or "gelu"
    return ModelInfo(
        source=source, model_type=model_type, arch=ARCH_OF.get(model_type, "generic"), task=task,
        hidden=hidden, layers=config.num_hidden_layers, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
        intermediate=intermediate, vocab=config.vocab_size, num_labels=getattr(config, "num_labels", 2),
        tied=bool(getattr(config, "tie_word_embeddings", False)), activation=str(act),
        attn_dropout=float(_first(config, "attention_dropout", "attn_pdrop", "attention_probs_dropout_prob")),
        hidden_dropout=float(_first(config, "resid_pdrop", "hidden_dropout_prob", "hidden_dropout")),
        embd_dropout=float(_first(config, "embd_pdrop", "hidden_dropout_prob")),
    )


def _first(config, *names: str) -> float:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, (int, float)):
            return value
    return 0.0


def describe_model(spec: Any, task: str | None = None) -> ModelInfo:
    """Read `spec`'s config and count its parameters exactly on the meta device.

    Args:
        spec: a local HF model dir, a config.json path, a packaged alias, a config dict or a PretrainedConfig.
        task: "causal-lm" or "classification"; None infers it from the config (encoders: classification).

    Returns:
        The `ModelInfo` of the model. Raises `ArtifactError` for a missing path and `ConfigError` for a config
        that is not JSON, lacks a needed key, or names an architecture transformers cannot build.
    """
    config, source = load_config(spec)
    if task not in (None, "causal-lm", "classification"):
        raise ConfigError(f"task {task!r}: expected 'causal-lm' or 'classification'")
    task = task or infer_task(config)
    info = _shapes(config, source, task)
    inventory(info, build_meta_model(config, task))
    return info



def storage_bytes(model: nn.Module) -> int:
    """Bytes a live model's parameters and buffers occupy (shared storages once; NF4 and other tensor subclasses
    by their inner tensors): the weights term to compare with a measured peak."""
    seen: dict[int, int] = {}

    def add(t: torch.Tensor) -> None:
        if hasattr(t, "__tensor_flatten__"):
            for inner in t.__tensor_flatten__()[0]:
                add(getattr(t, inner))
        else:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    for t in [*model.parameters(), *model.buffers()]:
        add(t)
    return sum(seen.values())
