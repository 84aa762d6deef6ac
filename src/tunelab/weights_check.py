"""A model's config.json checked against its weight headers before the model is built.

A config that disagrees with the weights (another vocabulary or FFN size, 10^7 layers over 2 layers of
weights) would otherwise surface as a long load report, or as minutes spent building layers that have no
weights. Only the safetensors headers are read (names and shapes, no tensor data); the expected shapes come
from the model built on the `meta` device, which allocates nothing.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tunelab.errors import ArtifactError

LAYER_RE = re.compile(r"^(?P<stack>(?:.*\.)?(?:layers|layer|h|blocks))\.(?P<index>\d+)\.")


def header_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor in the safetensors `files`, from their headers only."""
    from safetensors import safe_open

    shapes = {}
    for file in files:
        with safe_open(str(file), framework="pt") as st:
            for key in st.keys():
                shapes[key] = tuple(st.get_slice(key).get_shape())
    return shapes


def _layers_in(shapes: dict[str, tuple[int, ...]]) -> int | None:
    """The layer count of the weights' one stack of numbered layers (None when there is none, or several)."""
    stacks: dict[str, set[int]] = {}
    for key in shapes:
        if m := LAYER_RE.match(key):
            stacks.setdefault(m["stack"], set()).add(int(m["index"]))
    return max(next(iter(stacks.values()))) + 1 if len(stacks) == 1 else None


def _keys_with_value(config: dict, value: int) -> list[str]:
    return [k for k, v in config.items() if isinstance(v, int) and not isinstance(v, bool) and v == value]


_FITTED: set[tuple] = set()  # the (config, files) this process has checked and found to fit


def check_config_fits_weights(path: Path, config: dict, files: list[Path], trust_remote_code: bool = False) -> None:
    """Refuse, in one line naming the config key, a config.json whose layer count or tensor shapes disagree
    with the weight headers of `files`. A model dir that passed is not checked again in this process while its
    config and files are unchanged (the check builds the model on the meta device: about a second)."""
    key = (json.dumps(config, sort_keys=True, default=str), trust_remote_code,
           tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    if key in _FITTED:
        return
    _check_fit(path, config, files, trust_remote_code)
    _FITTED.add(key)


def _check_fit(path: Path, config: dict, files: list[Path], trust_remote_code: bool) -> None:
    from transformers import AutoConfig

    source = path / "config.json"
    shapes = header_shapes(files)
    try:
        cfg = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{source}: not a config transformers can read ({str(e).splitlines()[0]})") from None
    layers, stored = getattr(cfg, "num_hidden_layers", None), _layers_in(shapes)
    if isinstance(layers, int) and stored is not None and layers != stored:
        key = next((k for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers") if k in config),
                   "num_hidden_layers")
        raise ArtifactError(f"{source}: {key} is {layers}, but the weights hold {stored} layers; "
                            f"expected the config the weights were saved with")
    expected = _meta_shapes(cfg, trust_remote_code)
    for key, shape in shapes.items():
        base_key = key if key in expected else key.split(".", 1)[-1]
        want = expected.get(base_key)
        if want is None or want == shape:
            continue
        named = [f"{k} = {a}" for a, b in zip(want, shape) if a != b for k in _keys_with_value(config, a)]
        what = ", ".join(dict.fromkeys(named)) or "its sizes"
        raise ArtifactError(f"{source}: {what} disagrees with the weights: {key} has shape {list(shape)}, the "
                            f"config implies {list(want)}")


def _meta_shapes(cfg, trust_remote_code: bool) -> dict[str, tuple[int, ...]]:
    """name -> shape of the base model (no task head) that `cfg` describes, built without allocating."""
    import torch
    from transformers import AutoModel

    try:
        with torch.device("meta"):
            model = AutoModel.from_config(cfg, trust_remote_code=trust_remote_code)
    except Exception:  # a config transformers cannot build a model from: its own loader then says why
        return {}
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}
