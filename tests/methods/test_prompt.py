"""prompt: the method matrix on tiny Llama, GPT-2 and BERT, logits aligned with the inputs, generation with the
KV cache, parity with HF PEFT's PROMPT_TUNING both ways, the initialisations, and errors."""

from __future__ import annotations

import json

import pytest
import torch
from _matrix import (
    KINDS, check_count, check_generate_cache, check_padded_rows, check_train_keeps_base, check_two_adapters,
    labelled_batch, outputs,
)
from conftest import build_tiny, sample_batch
from safetensors.torch import load_file, save_file

from tunelab.config import build_config, parse_set
from tunelab.errors import ArtifactError, ConfigError
from tunelab.methods import get_method
from tunelab.methods.base import adapter_state, disabled, set_active
from tunelab.validation import parse_model

peft = pytest.importorskip("peft")  # the reference implementation (a test dependency)
METHOD = get_method("prompt")
OPTS = METHOD.Options(num_virtual_tokens=4)
DECODERS = ("llama", "gpt2")


@pytest.mark.parametrize("check", (check_train_keeps_base, check_two_adapters, check_count), ids=lambda c: c.__name__)
@pytest.mark.parametrize("kind", KINDS)
def test_matrix(kind, check, tokenizer):
    check(kind, tokenizer, "prompt", OPTS)


def injected(kind, tokenizer, name="default", options=OPTS):
    model = build_tiny(kind, tokenizer)
    METHOD.inject(model, options, name)
    set_active(model, [name])
    return model


@pytest.mark.parametrize("kind", KINDS)
def test_outputs_aligned_with_inputs_and_disabled(kind, tokenizer):
    """Logits and hidden states keep the caller's shape; the prompt changes them; disabled gives the base."""
    batch = labelled_batch(tokenizer, kind)
    base = outputs(build_tiny(kind, tokenizer), batch)
    model = injected(kind, tokenizer)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    length = batch["input_ids"].shape[1]
    want = (2, 3) if kind == "bert" else (2, length, len(tokenizer))
    assert tuple(out.logits.shape) == want
    assert all(h.shape[1] == length for h in out.hidden_states)
    with torch.no_grad():  # input_ids given positionally reach the hook too
        assert torch.equal(model(batch["input_ids"]).logits, model(input_ids=batch["input_ids"]).logits)
    assert not torch.allclose(outputs(model, batch), base, atol=1e-4)
    with disabled(model):
        assert torch.equal(outputs(model, batch), base)
    set_active(model, [])
    assert torch.equal(outputs(model, batch), base)


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_same_logits(kind, tokenizer, tmp_path):
    """state_dict + adapter_config -> safetensors -> a fresh base -> inject + load -> the same logits."""
    batch = labelled_batch(tokenizer, kind)
    model = injected(kind, tokenizer)
    want = outputs(model, batch)
    sd = METHOD.state_dict(model, "default")
    heads = {"base_model.classifier.weight", "base_model.classifier.bias"} if kind == "bert" else set()
    assert set(sd) == {"prompt_embeddings"} | heads and tuple(sd["prompt_embeddings"].shape) == (4, 32)
    save_file(sd, tmp_path / "adapter_model.safetensors")
    config = json.loads(json.dumps(METHOD.adapter_config(model, OPTS, "default")))

    torch.manual_seed(123)  # a different soft prompt before loading
    other = injected(kind, tokenizer, options=METHOD.options_from_config(config))
    METHOD.load_state_dict(other, load_file(tmp_path / "adapter_model.safetensors"), "default")
    assert torch.equal(outputs(other, batch), want)


def test_two_active_prompts_compose(tokenizer):
    """Two active soft prompts act as one prompt made of both, in activation order."""
    batch = labelled_batch(tokenizer, "llama")
    model = injected("llama", tokenizer, "a")
    METHOD.inject(model, METHOD.Options(num_virtual_tokens=2), "b")
    set_active(model, ["a", "b"])
    both = outputs(model, batch)
    joined = injected("llama", tokenizer, "ab", METHOD.Options(num_virtual_tokens=6))
    with torch.no_grad():
        joined.prompt_embeddings["ab"].copy_(torch.cat([model.prompt_embeddings["a"], model.prompt_embeddings["b"]]))
    assert torch.allclose(both, outputs(joined, batch), atol=1e-6)


@pytest.mark.parametrize("side", ("left", "right"))
@pytest.mark.parametrize("kind", DECODERS)
def test_padded_rows_match_rows_alone(kind, side, tokenizer):
    check_padded_rows(injected(kind, tokenizer), tokenizer, side)


@pytest.mark.parametrize("kind", DECODERS)
def test_generate_with_cache_equals_without(kind, tokenizer):
    check_generate_cache(injected(kind, tokenizer), tokenizer)


def _peft_out(model, batch):
    with torch.no_grad():
        out = model(**batch)
    length = batch["input_ids"].shape[1]
    return (out.logits if out.logits.dim() == 2 else out.logits[:, -length:]), out.loss


@pytest.mark.parametrize("kind", KINDS)
def test_peft_to_tunelab(kind, tokenizer):
    """A random soft prompt made by PEFT loads into tunelab: the same logits (PEFT's last L positions) and loss."""
    batch = labelled_batch(tokenizer, kind)  # with labels: the loss is compared too
    task = "SEQ_CLS" if kind == "bert" else "CAUSAL_LM"
    peft_model = peft.get_peft_model(build_tiny(kind, tokenizer),
                                     peft.PromptTuningConfig(task_type=task, num_virtual_tokens=5)).eval()
    want_logits, want_loss = _peft_out(peft_model, batch)
    sd = peft.get_peft_model_state_dict(peft_model)
    model = injected(kind, tokenizer, options=METHOD.options_from_config(peft_model.peft_config["default"].to_dict()))
    assert set(METHOD.state_dict(model, "default")) == set(sd)
    METHOD.load_state_dict(model, sd, "default")
    got_logits, got_loss = _peft_out(model, batch)
    assert torch.allclose(got_logits, want_logits, atol=1e-5)
    assert torch.allclose(got_loss, want_loss, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_tunelab_to_peft(kind, tokenizer, tmp_path):
    """tunelab's artifact loads in `PeftModel.from_pretrained`: the same logits and loss."""
    batch = labelled_batch(tokenizer, kind)  # with labels: the loss is compared too
    model = injected(kind, tokenizer)
    want_logits, want_loss = _peft_out(model, batch)
    save_file(METHOD.state_dict(model, "default"), tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps(METHOD.adapter_config(model, OPTS, "default")))
    loaded = peft.PeftModel.from_pretrained(build_tiny(kind, tokenizer), tmp_path).eval()
    got_logits, got_loss = _peft_out(loaded, batch)
    assert torch.allclose(got_logits, want_logits, atol=1e-5)
    assert torch.allclose(got_loss, want_loss, atol=1e-5)


# --- initialisation ---------------------------------------------------------------------------------------

def test_text_init_repeats_the_text_tokens(tokenizer, tokenizer_dir, tmp_path):
    """init=text: the embeddings of init_text's tokens, repeated to num_virtual_tokens (PEFT's TEXT), and the
    artifact says so in PEFT's fields (PEFT loads it)."""
    ids = tokenizer("hello fox")["input_ids"]
    n = 2 * len(ids) + 1  # two whole copies and one token of a third
    options = METHOD.Options(num_virtual_tokens=n, init="text", init_text="hello fox",
                             tokenizer_name_or_path=str(tokenizer_dir))
    model = injected("llama", tokenizer, options=options)
    want = model.get_input_embeddings().weight[ids + ids + ids[:1]]
    assert torch.equal(model.prompt_embeddings["default"], want)
    config = METHOD.adapter_config(model, options, "default")
    assert (config["prompt_tuning_init"], config["prompt_tuning_init_text"]) == ("TEXT", "hello fox")
    assert config["tokenizer_name_or_path"] == str(tokenizer_dir)
    save_file(METHOD.state_dict(model, "default"), tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    loaded = peft.PeftModel.from_pretrained(build_tiny("llama", tokenizer), tmp_path).eval()
    batch = sample_batch(tokenizer)
    assert torch.allclose(_peft_out(loaded, batch)[0], _peft_out(model, batch)[0], atol=1e-5)


def test_text_init_reads_the_models_own_tokenizer(tokenizer, tiny_dirs):
    """Without tokenizer_name_or_path, the tokenizer saved in the model's local dir is used."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"])
    options = METHOD.Options(num_virtual_tokens=3, init="text", init_text="the quick brown fox jumps")
    METHOD.inject(model, options, "default")
    ids = tokenizer("the quick brown fox jumps")["input_ids"][:3]
    assert torch.equal(model.prompt_embeddings["default"], model.get_input_embeddings().weight[ids])


def test_sample_vocab_init_uses_vocabulary_rows(tiny_llama):
    METHOD.inject(tiny_llama, METHOD.Options(num_virtual_tokens=5, init="sample_vocab"), "default")
    vocab = tiny_llama.get_input_embeddings().weight
    prompt = tiny_llama.prompt_embeddings["default"]
    assert all(any(torch.equal(row, v) for v in vocab) for row in prompt)


def test_set_options_select_prompt():
    cfg = build_config({}, {"method": "prompt", "method_options": parse_set(
        ["num_virtual_tokens=8", "init=text", "init_text=classify the topic"])})
    opts = cfg.method_opts()
    assert (opts.num_virtual_tokens, opts.init, opts.init_text) == (8, "text", "classify the topic")


# --- errors -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("values, needle", [
    ({"num_virtual_tokens": 0}, "num_virtual_tokens"),
    ({"init": "text"}, "init_text"),
    ({"init": "zeros"}, "init"),
    ({"num_virtual_token": 4}, "did you mean 'num_virtual_tokens'"),
])
def test_bad_options(values, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_model(METHOD.Options, values, where="--set for method 'prompt'")


def test_text_init_without_tokenizer(tiny_llama):
    with pytest.raises(ConfigError, match="needs a tokenizer"):
        METHOD.inject(tiny_llama, METHOD.Options(init="text", init_text="hi"), "default")
    with pytest.raises(ConfigError, match="tokenizer_name_or_path '/nonexistent/tok'"):
        options = METHOD.Options(init="text", init_text="hi", tokenizer_name_or_path="/nonexistent/tok")
        METHOD.inject(tiny_llama, options, "default")
    assert adapter_state(tiny_llama).methods == {} and not hasattr(tiny_llama, "prompt_embeddings")


def test_load_missing_wrong_shape_and_extra_keys(tiny_gpt2):
    METHOD.inject(tiny_gpt2, OPTS, "default")
    with pytest.raises(ArtifactError, match="prompt adapter 'default': missing keys prompt_embeddings"):
        METHOD.load_state_dict(tiny_gpt2, {}, "default")
    with pytest.raises(ArtifactError, match=r"prompt_embeddings has shape \(5, 32\), the base model needs \(4, 32\)"):
        METHOD.load_state_dict(tiny_gpt2, {"prompt_embeddings": torch.zeros(5, 32)}, "default")
    with pytest.raises(ArtifactError, match="unexpected keys base_model.model.lm_head.weight"):
        METHOD.load_state_dict(tiny_gpt2, {"prompt_embeddings": torch.zeros(4, 32),
                                           "base_model.model.lm_head.weight": torch.zeros(1)}, "default")


def test_encoder_decoder_config_refused():
    with pytest.raises(ArtifactError, match="num_transformer_submodules 2"):
        METHOD.options_from_config({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4,
                                    "num_transformer_submodules": 2})


def test_duplicate_unknown_and_mixed_batches(tiny_llama, tokenizer):
    METHOD.inject(tiny_llama, OPTS, "default")
    with pytest.raises(ConfigError, match="already exists"):
        METHOD.inject(tiny_llama, OPTS, "default")
    with pytest.raises(ConfigError, match="no prompt adapter 'other'"):
        METHOD.state_dict(tiny_llama, "other")
    adapter_state(tiny_llama).row_adapters = ["default", None]
    with pytest.raises(ConfigError, match="cannot serve mixed-adapter batches"):
        tiny_llama(**sample_batch(tokenizer))
