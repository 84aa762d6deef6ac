"""Added tokens: new special tokens in the tokenizer, and only their embedding rows trained with an adapter.

`add_tokens` adds special tokens to the tokenizer and resizes the model's embeddings (new rows start at the old
rows' mean, transformers' `mean_resizing`). With an adapter method, the base stays frozen and each adapter gets
its own fp32 copy of the new rows, as HF PEFT's `trainable_token_indices` does (`TrainableTokensLayer`):
- the input embedding holds `trainable_tokens_delta[name]` (k, hidden), the *values* of rows `indices` (not a
  difference: rows the resize filled at random never leak into a loaded adapter); a forward hook replaces the
  looked-up rows of those ids;
- an output head not tied to the embedding gets its own copy (the new tokens' logit weights); a tied head reads
  the embedding's copy. A forward hook replaces the logits of those ids with x @ rows.T.
Saved keys are PEFT's, `base_model.model.<module>.token_adapter.trainable_tokens_delta`, and adapter_config.json's
`trainable_token_indices` is a list (the embedding; a tied head follows it) or `{"embed_tokens": [...],
"lm_head": [...]}`. PEFT allows it on LoRA configs only, so the LoRA family (and `full`, which trains every row
anyway) may add tokens. The `Method` interface (`base.py`) calls these helpers around each method's own
operations, as it does for the classification heads (`heads.py`).
"""

from __future__ import annotations

import torch
from torch import nn

from tunelab.errors import ArtifactError, ConfigError
from tunelab.methods.kit import adapter_state, applying, container, drop, hook_once, peft_key, unhook

DELTA = "trainable_tokens_delta"  # ParameterDict: adapter name -> (k, hidden) rows
INDICES = "_tunelab_token_indices"  # module __dict__ entry: adapter name -> token ids (list)
TIED = "_tunelab_token_source"  # a tied output head: the embedding module whose rows it reads
HOOK = "tunelab_tokens"
STATE = "_tunelab_token_state"  # the model's AdapterState, read by the hooks
SAVED = "token_adapter.trainable_tokens_delta"


def check_method(method) -> None:
    """Refuse added tokens with a method whose artifact cannot carry them (PEFT: LoRA configs only)."""
    if method.artifact != "model" and method.peft_type != "LORA":
        raise ConfigError(f"add_tokens: method '{method.name}' cannot train the new tokens' rows (HF PEFT saves "
                          f"them with LoRA-family adapters only); use lora, dora, qlora or full")


def add_tokens(tokenizer, model: nn.Module, tokens: list[str]) -> list[int]:
    """Add `tokens` to `tokenizer` as special tokens and resize `model`'s embeddings; return their ids."""
    vocab = tokenizer.get_vocab()
    known = [t for t in tokens if t in vocab]
    if known:
        raise ConfigError(f"add_tokens: {known[0]!r} is already token {vocab[known[0]]} of the tokenizer; "
                          f"expected new tokens only")
    tokenizer.add_tokens(list(tokens), special_tokens=True)
    model.resize_token_embeddings(len(tokenizer))
    return tokenizer.convert_tokens_to_ids(list(tokens))


def token_modules(model: nn.Module) -> tuple[str | None, str | None, bool]:
    """(input embedding path, output head path, whether the head shares the embedding's weight); Nones for a
    model that has no input embedding (not a transformers model)."""
    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None, None, False
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    paths = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    tied = head is not None and head.weight is emb.weight
    return paths.get(id(emb)), (paths.get(id(head)) if head is not None else None), tied


def training_rows(model: nn.Module, ids: list[int]) -> dict[str, list[int]]:
    """The rows a new adapter trains for new token `ids`: the embedding's, and an untied head's."""
    emb, head, tied = token_modules(model)
    return {emb: list(ids), **({head: list(ids)} if head is not None and not tied else {})}


def attach_tokens(model: nn.Module, name: str, rows: dict[str, list[int]]) -> None:
    """Give adapter `name` trainable fp32 copies of `rows` ({module path: token ids}) of the embedding and head."""
    emb_path, head_path, tied = token_modules(model)
    state = adapter_state(model)
    for path, ids in rows.items():
        module = model.get_submodule(path)
        if path not in (emb_path, head_path):
            raise ConfigError(f"trainable_token_indices: module {path} is neither the input embedding "
                              f"({emb_path}) nor the output head; expected one of those")
        if not ids or max(ids) >= module.weight.shape[0] or min(ids) < 0:
            raise ArtifactError(f"trainable_token_indices: ids {min(ids, default=None)}..{max(ids, default=None)} "
                                f"for {path}, which has {module.weight.shape[0]} rows")
        rows_now = module.weight.detach()[torch.tensor(ids, device=module.weight.device)].float().clone()
        container(module, DELTA, nn.ParameterDict)[name] = nn.Parameter(rows_now)
        _enable(module, name, ids, state, path == head_path)
    if tied and emb_path in rows and head_path not in rows:
        head = model.get_submodule(head_path)
        head.__dict__[TIED] = model.get_submodule(emb_path)
        _enable(head, name, rows[emb_path], state, True)


def _enable(module: nn.Module, name: str, ids: list[int], state, is_head: bool) -> None:
    module.__dict__.setdefault(INDICES, {})[name] = list(ids)
    module.__dict__[STATE] = state
    hook_once(module, HOOK, _head_hook if is_head else _embedding_hook)


def _rows_of(module: nn.Module, name: str) -> torch.Tensor:
    source = module.__dict__.get(TIED) if name not in getattr(module, DELTA, {}) else module
    return getattr(source, DELTA)[name]


def _index(module: nn.Module, name: str, device) -> torch.Tensor:
    return torch.tensor(module.__dict__[INDICES][name], dtype=torch.long, device=device)


def _embedding_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Rows of the new tokens from the active adapter: ids (batch, seq) -> output (batch, seq, hidden)."""
    ids = args[0]
    for name, mask in applying(module.__dict__[STATE], list(module.__dict__[INDICES]), output):
        index = _index(module, name, ids.device)
        slot = torch.full((module.weight.shape[0],), -1, dtype=torch.long, device=ids.device)
        slot[index] = torch.arange(len(index), device=ids.device)
        where = slot[ids]  # (batch, seq): the row of each id in the copy, -1 for other ids
        hit = (where >= 0).unsqueeze(-1)
        if mask is not None:
            hit = hit & mask.bool()
        rows = _rows_of(module, name).to(output.dtype)[where.clamp(min=0)]  # (batch, seq, hidden)
        output = torch.where(hit, rows, output)
    return output


def _head_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Logits of the new tokens from the active adapter's rows: x (..., hidden) -> output (..., vocab)."""
    x = args[0]
    for name, mask in applying(module.__dict__[STATE], list(module.__dict__[INDICES]), output):
        rows = _rows_of(module, name)
        index = _index(module, name, output.device)
        new = (x.to(rows.dtype) @ rows.T).to(output.dtype)  # (..., k)
        if getattr(module, "bias", None) is not None:
            new = new + module.bias[index].to(output.dtype)
        if mask is not None:
            new = torch.where(mask.bool(), new, output.index_select(-1, index))
        output = output.index_copy(-1, index, new)
    return output


def _holders(model: nn.Module, name: str) -> list[tuple[str, nn.Module]]:
    """(path, module) of the embedding and head that hold rows of adapter `name`."""
    emb, head, _ = token_modules(model)
    return [(p, model.get_submodule(p)) for p in (emb, head)
            if p is not None and name in model.get_submodule(p).__dict__.get(INDICES, {})]


def token_parameters(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """Adapter `name`'s own rows, keyed by qualified name in `model` (a tied head owns none)."""
    return {f"{p}.{DELTA}.{name}": getattr(m, DELTA)[name] for p, m in _holders(model, name)
            if name in getattr(m, DELTA, {})}


def token_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Adapter `name`'s rows (live) under PEFT's saved keys."""
    return {peft_key(p, SAVED): getattr(m, DELTA)[name] for p, m in _holders(model, name)
            if name in getattr(m, DELTA, {})}


def config_field(model: nn.Module, name: str) -> dict:
    """adapter_config.json's `trainable_token_indices` for adapter `name` ({} when it has no token rows)."""
    owned = [(p, m) for p, m in _holders(model, name) if name in getattr(m, DELTA, {})]
    if not owned:
        return {}
    if len(owned) == 1 and owned[0][0] == token_modules(model)[0]:
        return {"trainable_token_indices": list(owned[0][1].__dict__[INDICES][name])}
    return {"trainable_token_indices": {p.rsplit(".", 1)[-1]: list(m.__dict__[INDICES][name]) for p, m in owned}}


def rows_from_config(model: nn.Module, value) -> dict[str, list[int]]:
    """`trainable_token_indices` of a config (a list: the embedding; a dict: module names) as {path: ids}."""
    emb, head, _ = token_modules(model)
    if isinstance(value, list):
        return {emb: [int(i) for i in value]}
    if not isinstance(value, dict):
        raise ArtifactError(f"trainable_token_indices: expected a list of token ids or a dict of them, found "
                            f"{type(value).__name__}")
    out = {}
    for key, ids in value.items():
        path = next((p for p in (emb, head) if p is not None and (p == key or p.endswith(f".{key}"))), None)
        if path is None or not isinstance(ids, list):
            raise ArtifactError(f"trainable_token_indices: key {key!r} is not the input embedding ({emb}) or the "
                                f"output head ({head}) with a list of ids")
        out[path] = [int(i) for i in ids]
    return out


def fit_vocab(model: nn.Module, rows: dict[str, list[int]], vocab_size: int | None, source: str) -> None:
    """Resize `model`'s embeddings to `vocab_size` (the saved tokenizer's length) when the rows need it."""
    needed = max(max(ids) for ids in rows.values()) + 1
    have = model.get_input_embeddings().weight.shape[0]
    if needed <= have:
        return
    if vocab_size is None or vocab_size < needed:
        raise ArtifactError(f"{source}: trainable_token_indices reach id {needed - 1}, the base has {have} rows "
                            f"and no tokenizer saved with the adapter covers them; expected the adapter's tokenizer")
    model.resize_token_embeddings(vocab_size, mean_resizing=False)


@torch.no_grad()
def merge_tokens(model: nn.Module, name: str, merged: bool) -> None:
    """Write adapter `name`'s rows into the base weights (`merged`), keeping the base rows to restore them."""
    for _, module in _holders(model, name):
        if name not in getattr(module, DELTA, {}):
            continue  # a tied head: the embedding's weight is its weight
        index = _index(module, name, module.weight.device)
        backups = module.__dict__.setdefault("_tunelab_token_base", {})
        if merged:
            backups[name] = module.weight[index].clone()
            module.weight[index] = getattr(module, DELTA)[name].to(module.weight.dtype)
        elif name in backups:
            module.weight[index] = backups.pop(name)


def remove_tokens(model: nn.Module, name: str) -> None:
    """Drop adapter `name`'s rows and hooks (merged rows stay in the weights: merge-and-unload)."""
    for _, module in _holders(model, name):
        module.__dict__[INDICES].pop(name)
        module.__dict__.get("_tunelab_token_base", {}).pop(name, None)
        drop(module, DELTA, name)
        if not module.__dict__[INDICES]:
            unhook(module, HOOK)
            for key in (INDICES, TIED, STATE, "_tunelab_token_base"):
                module.__dict__.pop(key, None)


BASE_SAVED = "token_adapter.base_layer.weight"  # PEFT also saves a resized embedding (or head) in full


def split_base_layers(model: nn.Module, sd: dict[str, torch.Tensor], source: str):
    """(sd without them, {module path: weight}) for the whole resized embedding / head PEFT saved beside the
    rows; each is checked against the module's shape (after `fit_vocab`), before anything is loaded. The rows
    PEFT also saves for a tied head are the embedding's, and are dropped."""
    _, head, tied = token_modules(model)
    rest, full = {}, {}
    for key, tensor in sd.items():
        if tied and key == peft_key(head, SAVED):
            continue
        if not key.endswith(f".{BASE_SAVED}"):
            rest[key] = tensor
            continue
        path = key.removeprefix("base_model.model.").removesuffix(f".{BASE_SAVED}")
        weight = model.get_submodule(path).weight if path in dict(model.named_modules()) else None
        if weight is None or tuple(weight.shape) != tuple(tensor.shape):
            found = tuple(weight.shape) if weight is not None else "no such module"
            raise ArtifactError(f"{source}: {key} has shape {tuple(tensor.shape)}, the base needs {found}")
        full[path] = tensor
    return rest, full


@torch.no_grad()
def load_base_layers(model: nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Copy the saved whole embedding / head weights into the (resized) base, as PEFT's loader does."""
    for path, tensor in full.items():
        weight = model.get_submodule(path).weight
        weight.copy_(tensor.to(weight.dtype))
