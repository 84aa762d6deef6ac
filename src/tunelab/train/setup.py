"""Building a run from its config: model, data, the method's adapter, trainable parameters, optimizer."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from tunelab.config import RunConfig
from tunelab.data import Dataset, load_data
from tunelab.errors import ConfigError
from tunelab.methods import get_method, tokens
from tunelab.methods.base import Method, adapter_module_prefixes, adapter_state, mark_trainable, output_head_names
from tunelab.models import LoadedModel, load_model, read_config, resolve_spec
from tunelab.models import load_tokenizer as read_tokenizer
from tunelab.modules import linear_like, name_matches
from tunelab.train import distributed, rng
from tunelab.train.activations import enable_gradient_checkpointing  # noqa: F401  (re-exported)
from tunelab.train.batches import total_steps
from tunelab.train.memory import rss_bytes
from tunelab.train.optim import build_optimizer, build_scheduler, resolve_lr
from tunelab.train.state import Trainables

log = logging.getLogger("tunelab.train")


@dataclass
class Run:
    """Everything the loop works with, built once from the config."""

    cfg: RunConfig
    loaded: LoadedModel
    dataset: Dataset
    trainables: Trainables
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    lr: float
    total_steps: int
    idle_rss_bytes: int
    world: distributed.World = field(default_factory=distributed.World)

    @property
    def model(self) -> nn.Module:
        return self.loaded.model

    @property
    def device(self) -> torch.device:
        return torch.device(self.loaded.device)

    @property
    def pad_id(self) -> int:
        return self.loaded.pad_id


def build_run(cfg: RunConfig, world: distributed.World | None = None) -> Run:
    """Load the model and data, inject the method's adapter, and build the optimizer and schedule.

    The seed is set before the model loads and before injection, so fresh heads and adapter weights are the
    same in every run with this config (a resume then overwrites them from the checkpoint). Under torchrun
    (`world.enabled`) the model is sharded or replicated before the optimizer sees its parameters.
    """
    world = world or distributed.World()
    idle_rss = rss_bytes()
    rng.seed_everything(cfg.seed)
    method = get_method(cfg.method)
    options = cfg.method_opts()
    loaded, dataset = load_model_and_data(cfg)
    model = loaded.model
    touched = method.inject(model, options, cfg.adapter_name)
    check_every_target_matched(model, options, touched or [])
    if cfg.add_tokens and method.artifact == "adapter":  # the base stays frozen: the adapter trains the new rows
        ids = loaded.tokenizer.convert_tokens_to_ids(cfg.add_tokens)
        tokens.attach_tokens(model, cfg.adapter_name, tokens.training_rows(model, ids))
    state = adapter_state(model)  # methods record themselves on inject; fill in what one left out
    state.methods.setdefault(cfg.adapter_name, method.name)
    state.options.setdefault(cfg.adapter_name, options)
    state.targets.setdefault(cfg.adapter_name, list(touched or []))
    state.active = (cfg.adapter_name,)
    trainables = select_trainables(model, method, cfg.adapter_name, cfg.task)
    if cfg.liger_kernels:
        apply_liger_kernels(model, torch.device(loaded.device))
    if cfg.gradient_checkpointing:
        offload = cfg.offload_activations and torch.device(loaded.device).type == "cuda"
        enable_gradient_checkpointing(model, every=cfg.checkpoint_every, offload=offload)
    if world.enabled:
        spread(world, cfg, loaded, method, trainables)
    lr = resolve_lr(cfg, method)
    groups = method.param_groups(model, cfg.adapter_name, lr, cfg.weight_decay)
    if trainables.extra:
        groups.append({"params": list(trainables.extra.values()), "lr": lr, "weight_decay": cfg.weight_decay})
    steps = total_steps(cfg, len(dataset.train))
    optimizer = build_optimizer(groups, cfg, torch.device(loaded.device))
    return Run(cfg, loaded, dataset, trainables, optimizer, build_scheduler(optimizer, cfg, steps), lr, steps, idle_rss,
               world)


def spread(world: distributed.World, cfg: RunConfig, loaded: LoadedModel, method: Method, t: Trainables) -> None:
    """Shard (FSDP2) or replicate (DDP) the model over the ranks; trainables found before now are refreshed,
    since FSDP2 puts a sharded parameter in place of each one."""
    strategy = distributed.choose_strategy(cfg.strategy, loaded.model, method.name, world.size)
    if strategy == "fsdp" and cfg.master_weights:
        distributed.hold_trained_in_fp32(world, loaded.model)  # FSDP2's policy casts them to bf16 for compute
    cuda = torch.device(loaded.device).type == "cuda"
    bf16 = loaded.dtype == torch.bfloat16 and (cuda or bool(world.masters))
    distributed.wrap(world, loaded.model, strategy, bf16, cfg.reshard_after_forward)
    params = dict(loaded.model.named_parameters())
    t.extra = {q: params[q] for q in t.extra}
    log.info("rank %d of %d: %s%s", world.rank, world.size, strategy,
             " (gathered weights kept from forward to backward)" if world.keep_gathered else "")


def check_every_target_matched(model: nn.Module, options, touched: list[str]) -> None:
    """Each name listed in `target_modules` must select a module the method touched.

    `find_targets` refuses a list that matches nothing at all; here a misspelt entry beside good ones
    (`[q_proj, v_prj]`) is refused too, instead of training a silently smaller adapter.
    """
    wanted = getattr(options, "target_modules", None)
    if not isinstance(wanted, list):  # None (the method's default), a regex or "all-linear"
        return
    unmatched = [t for t in wanted if not any(name_matches(n, (t,)) for n in touched)]
    if unmatched:
        owned = adapter_module_prefixes(model)  # the new adapter's own layers are not candidates
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                         if n and linear_like(m) and not n.startswith(owned)})
        raise ConfigError(f"target_modules entries {unmatched} matched no module (of {wanted}); "
                          f"some module names in this model: {', '.join(leaves[:8]) or 'none'}")


def load_model_and_data(cfg: RunConfig) -> tuple[LoadedModel, Dataset]:
    """Load the model and the data set. Classification reads the labels first, so the head gets their count."""
    def model_with(label_names):
        return load_model(cfg.model, cfg.task, dtype=cfg.dtype, device=cfg.device,
                          trust_remote_code=cfg.trust_remote_code, label_names=label_names)

    def data_with(tokenizer, label_names=None):
        return load_data(cfg.data, tokenizer, cfg.task, cfg.seq_len, packing=cfg.packing,
                         packing_documents=cfg.documents_packed(),
                         truncation=cfg.truncation, val_fraction=cfg.val_fraction, label_names=label_names,
                         columns=cfg.columns, chat_template=cfg.chat_template)

    if cfg.task != "classification":
        loaded = model_with(None)
        if cfg.add_tokens:  # before the data: chat templates and texts may use the new tokens
            tokens.add_tokens(loaded.tokenizer, loaded.model, cfg.add_tokens)
        return loaded, data_with(loaded.tokenizer)
    tokenizer = load_tokenizer(cfg)
    dataset = data_with(tokenizer)
    loaded = model_with(list(dataset.label_names))
    return loaded, dataset


def load_tokenizer(cfg: RunConfig):
    """The model's tokenizer alone (to read classification labels before the head is sized)."""
    path = resolve_spec(cfg.model)
    read_config(path)  # a missing or invalid model dir is reported as such, not as a tokenizer problem
    return read_tokenizer(path, trust_remote_code=cfg.trust_remote_code)


def select_trainables(model: nn.Module, method: Method, name: str, task: str) -> Trainables:
    """Freeze the model except the method's parameters and, for classification, the head.

    The head (`classifier`/`score`) of a classification model is new and must train with every method.
    Methods normally own a copy of it (`tunelab.methods.heads`); when a method owns no parameter under the
    head, the head's own parameters are trained and checkpointed here as extras.
    """
    owned = method.parameters(model, name)
    extra = {}
    if task == "classification":
        heads = tuple(h + "." for h in output_head_names(model))
        if not any(q.startswith(heads) for q in owned):
            extra = {q: p for q, p in model.named_parameters() if q.startswith(heads)}
    mark_trainable(model, {**owned, **extra})
    return Trainables(model, method, name, extra)


def apply_liger_kernels(model: nn.Module, device: torch.device) -> bool:
    """Liger-Kernel's fused RMSNorm, SwiGLU and RoPE on this model instance (CUDA, liger-kernel installed, a
    model type it knows); False when not applied, and the model keeps its own kernels.

    The model's forward and loss are left alone: tunelab's fused loss (`fused_loss`) calls Liger's fused linear
    cross-entropy itself, with reduction "sum" (the summed-loss contract). Liger patches the model class's module
    functions too (its RoPE), so later models of that type in this process share them.
    """
    if device.type != "cuda":
        return False
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        return False
    if getattr(model.config, "model_type", None) not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return False
    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    log.info("liger-kernel: fused RMSNorm, SwiGLU and RoPE applied (%s)", model.config.model_type)
    return True
