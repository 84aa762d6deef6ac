"""llama.cpp itself runs what `tunelab export --format gguf` writes (slow; not in the default suite).

On the embedded default (smollm2-135m) with a LoRA adapter: llama.cpp, through `llama-cpp-python`, loads the f32
base GGUF with the GGUF LoRA adapter, and the merged f32 GGUF, tokenizes the chat prompt as the HF tokenizer does
and greedy-generates the same first tokens as tunelab (transformers with the adapter). Run it with:

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_CURL=OFF" pip install --no-binary llama-cpp-python llama-cpp-python
    HF_HUB_OFFLINE=1 PYTHONPATH=src python -m pytest -m slow tests/artifacts/test_llama_cpp_slow.py

Without `llama_cpp` importable (no wheel built from source here), the test skips and says so.
"""

from __future__ import annotations

import pytest
import torch

from tunelab.artifacts import load_adapter, save_artifact
from tunelab.artifacts.export import export_lora, export_model
from tunelab.methods import get_method

pytestmark = [pytest.mark.slow, pytest.mark.integration]
NEW_TOKENS = 8
PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


def llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:
        pytest.skip(f"llama-cpp-python is not importable ({e}); build it from source with "
                    f"`pip install --no-binary llama-cpp-python llama-cpp-python` to run this test")
    return llama_cpp


def greedy_llama_cpp(module, model_path, prompt_ids, lora_path=None) -> tuple[list[int], list[int]]:
    """(llama.cpp's own tokenization of the prompt text, its first greedy tokens after `prompt_ids`)."""
    kwargs = {"lora_path": str(lora_path)} if lora_path else {}
    llm = module.Llama(model_path=str(model_path), n_ctx=256, n_threads=2, seed=0, verbose=False, **kwargs)
    out = []
    for token in llm.generate(prompt_ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
        out.append(token)
        if len(out) == NEW_TOKENS:
            break
    text = llm.detokenize(prompt_ids, special=True)
    return llm.tokenize(text, add_bos=False, special=True), out


def test_llama_cpp_runs_the_exported_model_and_lora_like_tunelab(tmp_path):
    module = llama_cpp()
    from tunelab.models import load_model

    loaded = load_model("smollm2-135m", dtype="float32", device="cpu")
    lora = get_method("lora")
    lora.inject(loaded.model, lora.Options(r=8, alpha=16, target_modules="all-linear"), "default")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a visible but sane change: small random B
        for name, p in lora.parameters(loaded.model, "default").items():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.02 if ".lora_B." in name else 0.05))
    save_artifact(loaded.model, loaded.tokenizer, "default", tmp_path / "adapter", base_model="smollm2-135m")
    model = load_model("smollm2-135m", dtype="float32", device="cpu")
    load_adapter(model.model, tmp_path / "adapter")
    text = model.tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    ids = model.tokenizer(text, add_special_tokens=False).input_ids
    with torch.no_grad():
        out = model.model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)
    want = out[0, len(ids):].tolist()
    export_model("smollm2-135m", tmp_path / "base.gguf", "f32")
    export_lora("smollm2-135m", tmp_path / "adapter", tmp_path / "lora.gguf", "f32")
    export_model("smollm2-135m", tmp_path / "merged.gguf", "f32", adapter=tmp_path / "adapter")
    tokens, with_lora = greedy_llama_cpp(module, tmp_path / "base.gguf", ids, tmp_path / "lora.gguf")
    assert tokens == ids
    assert with_lora == want
    assert greedy_llama_cpp(module, tmp_path / "merged.gguf", ids)[1] == want
