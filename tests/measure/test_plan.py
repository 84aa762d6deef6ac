"""The memory planner against hand-computed cases, real tiny models, and measured CPU training steps."""

from __future__ import annotations

import json

import pytest
import torch
from builders import build_tiny

from tunelab.errors import ArtifactError, ConfigError
from tunelab.measure.plan import PlanResult, method_options_for, parse_memory, phases, plan, render_plan
from tunelab.measure.plan_formulas import runtime
from tunelab.measure.plan_fsdp import sharded
from tunelab.measure.plan_methods import build_strategy
from tunelab.measure.plan_model import describe_model

# A Llama small enough to count by hand: hidden 64, 2 layers, 4 heads of 16, 2 key/value heads (kv_dim 32).
H, I, L, V, HEADS, KV_DIM = 64, 128, 2, 1000, 4, 32
LLAMA = {"model_type": "llama", "hidden_size": H, "intermediate_size": I, "num_hidden_layers": L,
         "num_attention_heads": HEADS, "num_key_value_heads": 2, "vocab_size": V, "tie_word_embeddings": False}


def by_method(result: PlanResult) -> dict:
    return {e.method: e for e in result.strategies}


def hand_llama_params() -> int:
    attention = H * H + H * KV_DIM + H * KV_DIM + H * H  # q, k, v, o (no biases)
    mlp = 3 * H * I  # gate, up, down
    per_layer = attention + mlp + 2 * H  # + two RMSNorm weights
    return V * H + L * per_layer + H + V * H  # embeddings, layers, final norm, untied lm_head


def test_llama_params_lora_and_adamw_by_hand():
    est = by_method(plan(LLAMA, batch_size=2, seq_len=16, dtype="float32", device="cpu"))
    assert hand_llama_params() == 202_048
    assert est["full"].params_trainable == 202_048
    lora = L * (8 * (H + H) + 8 * (H + KV_DIM))  # r * (in + out) on q_proj and v_proj
    assert est["lora"].params_trainable == lora == 3_584
    assert est["dora"].params_trainable == lora + L * (H + KV_DIM)  # + one magnitude per output
    assert est["ia3"].params_trainable == L * (KV_DIM + KV_DIM + I)  # k, v outputs + down_proj input
    assert est["prompt"].params_trainable == 20 * H
    assert est["prefix"].params_trainable == 2 * L * 20 * KV_DIM
    m = H // 16  # tunelab's default bottleneck: hidden // 16
    assert est["adapter"].params_trainable == L * 2 * (2 * H * m + m + H)  # Houlsby: 2 per block
    all_linear = L * 8 * ((H + H) + 2 * (H + KV_DIM) + (H + H) + 2 * (H + I) + (I + H))
    assert est["qlora"].params_trainable == all_linear  # qlora adapts every linear but the head by default
    assert est["bitfit"].params_trainable == L * 2 * H + H  # no biases: the norm weights
    # AdamW: two fp32 moments per fp32 parameter; gradients as large as the trainable weights
    assert est["full"].optimizer_bytes == 2 * 4 * 202_048
    assert est["lora"].optimizer_bytes == 2 * 4 * lora and est["lora"].gradients_bytes == 4 * lora
    assert est["full"].weights_bytes == 4 * 202_048
    assert est["lora"].weights_bytes == 4 * 202_048 + 4 * lora
    assert est["full"].artifact_bytes == 4 * 202_048 and est["lora"].artifact_bytes == 4 * lora


def test_bf16_on_cuda_keeps_adapters_fp32_and_full_states_in_bf16():
    est = by_method(plan(LLAMA, batch_size=2, seq_len=16, dtype="bfloat16", device="cuda", master_weights=False))
    lora = 3_584
    assert est["full"].weights_bytes == 2 * 202_048
    assert est["full"].optimizer_bytes == 2 * 2 * 202_048  # moments in the parameter dtype
    assert est["lora"].weights_bytes == 2 * 202_048 + 4 * lora
    assert est["lora"].optimizer_bytes == 2 * 4 * lora
    quantised = L * (2 * H * H + 2 * H * KV_DIM + 3 * H * I)  # every linear below the LM head
    nf4 = 0.5 + (8 / 64 + 32 / (64 * 256)) / 8  # 4 bits + double-quantised absmax (0.127 bit)
    all_linear = L * 8 * ((H + H) + 2 * (H + KV_DIM) + (H + H) + 2 * (H + I) + (I + H))
    expected = quantised * nf4 + (202_048 - quantised) * 2 + 4 * all_linear
    assert est["qlora"].weights_bytes == round(expected)
    assert est["full"].overhead_bytes == 1 << 30
    assert est["full"].total_bytes == est["full"].peak_tensor_bytes + (1 << 30)


def test_activations_and_peak_by_hand_fp32():
    """Per token and layer, full fine-tuning keeps (bytes, fp32): RMSNorm fp32 inputs 2*4h, normalised outputs
    2*4h, SDPA q, k, v, out 4*(h + kv + kv + h) + lse 4*heads, MLP gate/up/act 3*4*I, linear inputs
    (attention input 4h, MLP input 4h, down input 4I). Outside: final norm in/out, head input, int64 batch."""
    b, s = 8, 64
    tokens = b * s
    layer = 2 * 4 * H + 2 * 4 * H + 4 * (H + 2 * KV_DIM + H) + 4 * HEADS + 3 * 4 * I + (4 * H + 4 * H + 4 * I)
    final = 4 * H + 4 * H + 4 * H + 3 * 8
    est = by_method(plan(LLAMA, batch_size=b, seq_len=s, dtype="float32", device="cpu", fused_loss=False))
    assert layer == 4_368
    assert est["full"].activations_bytes == tokens * (L * layer + final)
    # LoRA freezes the base: no norm outputs or frozen-linear inputs, the shared q/v input once, A's output (r);
    # outside the blocks the final norm's input, but not the first norm's (nothing below it needs a gradient)
    lora_layer = 2 * 4 * H + 4 * (H + 2 * KV_DIM + H) + 4 * HEADS + 3 * 4 * I + 4 * H + 2 * 4 * 8
    assert est["lora"].activations_bytes == tokens * (L * lora_layer + 4 * H - 4 * H + 3 * 8)
    # the loss: 3 fp32 buffers per logit at the log_softmax backward (logits over s positions)
    assert est["full"].logits_bytes == 3 * 4 * b * s * V
    weights, states = 4 * 202_048, 8 * 202_048
    assert est["full"].peak_phase == "loss"
    assert est["full"].peak_tensor_bytes == weights + states + est["full"].activations_bytes + 3 * 4 * b * s * V
    # the fused loss (the default): hidden states and their gradient (n, h), the head's fp32 gradient (V, h), the
    # fp32 logits of one chunk (here all n = b * (s - 1) rows) and a second chunk-sized fp32 buffer
    fused = by_method(plan(LLAMA, batch_size=b, seq_len=s, dtype="float32", device="cpu"))
    n = b * (s - 1)
    assert fused["full"].logits_bytes == 2 * 4 * n * H + 4 * V * H + 4 * n * V + max(4 * n * V, 4 * V * H)
    assert fused["lora"].logits_bytes == 2 * 4 * n * H + 2 * 4 * n * V


def test_gradient_checkpointing_keeps_block_inputs_and_one_block():
    b, s = 2, 16
    plain = by_method(plan(LLAMA, batch_size=b, seq_len=s, dtype="float32", device="cpu"))
    ckpt = by_method(plan(LLAMA, batch_size=b, seq_len=s, dtype="float32", device="cpu",
                          gradient_checkpointing=True))
    final = (4 * H + 4 * H + 4 * H + 3 * 8) * b * s
    one_block = (plain["full"].activations_bytes - final) / L
    assert ckpt["full"].activations_bytes == round(L * 4 * H * b * s + one_block + final)
    assert ckpt["lora"].activations_bytes < plain["lora"].activations_bytes
    assert not ckpt["prefix"].supported and "checkpointing" in ckpt["prefix"].notes[-1]


def test_offloaded_activations_leave_two_block_inputs_on_the_gpu():
    cfg = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256,
           "max_position_embeddings": 262144}
    kw = dict(batch_size=1, seq_len=262144, methods=["lora"], method_options={"target_modules": "all-linear"},
              gradient_checkpointing=True)
    kept = by_method(plan(cfg, **kw))["lora"]
    parked = by_method(plan(cfg, offload_activations=True, **kw))["lora"]
    one_input = 2 * 4096 * 262144  # bf16 hidden states of one block's input
    assert kept.peak_phase == parked.peak_phase == "recompute"
    assert kept.peak_tensor_bytes - parked.peak_tensor_bytes == 30 * one_input  # 32 blocks' inputs, 2 stay
    assert kept.activations_bytes - parked.activations_bytes == 30 * one_input
    assert f"{32 * one_input / 2**30:.2f} GiB of block inputs in pinned host memory" in " ".join(parked.notes)
    for bad in (dict(kw, gradient_checkpointing=False), dict(kw, device="cpu")):
        with pytest.raises(ConfigError, match="offload_activations: expected gradient_checkpointing on a cuda"):
            plan(cfg, offload_activations=True, **bad)


def test_gpt2_shapes_and_lora_count():
    cfg = {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257,
           "n_positions": 1024}
    result = plan(cfg, batch_size=1, seq_len=128, methods=["full", "lora", "ia3"])
    est = by_method(result)
    assert result.params_total == 124_439_808  # GPT-2 small, lm_head tied to wte
    assert est["lora"].params_trainable == 12 * 8 * (768 + 3 * 768)  # fused c_attn: 768 -> 2304
    assert est["ia3"].params_trainable == 12 * (3 * 768 + 4 * 768)  # c_attn output + mlp.c_proj input
    assert est["full"].artifact_bytes == 2 * 124_439_808  # bf16 on CUDA, tied weight saved once


def test_meta_count_matches_real_tiny_models(tiny_dirs, tokenizer):

    for kind in ("llama", "gpt2", "bert"):
        real = build_tiny(kind, tokenizer)
        result = plan(tiny_dirs[kind], batch_size=2, seq_len=16, methods=["full"])
        assert result.params_total == sum(p.numel() for p in real.parameters()), kind
        assert result.task == ("classification" if kind == "bert" else "causal-lm")


@pytest.mark.parametrize("method", ["lora", "dora", "qlora", "adapter", "ia3", "prompt", "prefix", "bitfit"])
@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_trainable_counts_match_tunelab_methods(method, kind, tiny_dirs, tokenizer):
    from tunelab.methods import all_methods

    impl = all_methods().get(method)
    if impl is None or not hasattr(impl, "expected_trainable"):
        pytest.skip(f"method {method} is not registered here")
    model = build_tiny(kind, tokenizer)
    options = {"include_norms": True} if (method == "bitfit" and kind == "llama") else {}
    planned = by_method(plan(tiny_dirs[kind], batch_size=1, seq_len=8, methods=[method]))[method]
    if not planned.supported:  # the plan says why the method cannot train this model; the method agrees
        with pytest.raises(ConfigError):
            impl.inject(model, impl.Options(**options), "default")
        return
    impl.inject(model, impl.Options(**options), "default")
    real = sum(p.numel() for p in impl.parameters(model, "default").values() if p.requires_grad)
    assert planned.params_trainable == real


def test_gpu_memory_fit_and_largest_batch():
    base = by_method(plan(LLAMA, batch_size=5, seq_len=64, methods=["lora"]))["lora"]
    at_six = by_method(plan(LLAMA, batch_size=6, seq_len=64, methods=["lora"]))["lora"]
    assert at_six.total_bytes > base.total_bytes
    exact = by_method(plan(LLAMA, batch_size=5, seq_len=64, methods=["lora"], gpu_memory=base.total_bytes))
    assert exact["lora"].fits and exact["lora"].max_batch_size == 5
    below = by_method(plan(LLAMA, batch_size=5, seq_len=64, methods=["lora"], gpu_memory=base.total_bytes - 1))
    assert not below["lora"].fits and below["lora"].max_batch_size == 4
    tiny = by_method(plan(LLAMA, batch_size=1, seq_len=64, methods=["lora"], gpu_memory="1MB"))["lora"]
    assert tiny.fits is False and tiny.max_batch_size is None


def test_8b_plan_without_weights_and_its_orders_of_magnitude():
    cfg = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256}
    # the plain loss and bf16 AdamW, as measured when these figures were checked on an H200
    result = plan(cfg, batch_size=1, seq_len=1024, gpu_memory="80GB", methods=["full", "lora", "qlora"],
                  fused_loss=False, master_weights=False)
    est = by_method(result)
    assert result.params_total == 8_030_261_248  # Llama-3-8B
    # bf16 full fine-tuning: weights 2 + grads 2 + two bf16 moments 4 = 8 B/param, peaking at the (fused, in-place)
    # optimizer step when the activations of batch 1 x 1024 are smaller than the gradients
    assert est["full"].peak_phase == "optimizer step"
    assert est["full"].peak_tensor_bytes == 8 * 8_030_261_248 + 64 * 2**20  # + two 32 MiB cuBLAS workspaces
    assert est["full"].fits and est["full"].max_batch_size < est["lora"].max_batch_size
    assert est["lora"].fits and est["qlora"].weights_bytes < est["lora"].weights_bytes / 2.5
    # with the same adapters, NF4 saves 16 - 4.13 = 11.9 bits per linear weight and keeps no more activations
    # (torchao's NF4 linear keeps only its 4-bit weight), so the peak drops by exactly the weight saving
    same = by_method(plan(cfg, batch_size=1, seq_len=1024, methods=["lora", "qlora"],
                          method_options={"target_modules": "all-linear"}, fused_loss=False))
    linear_weights = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336)
    saving = same["lora"].weights_bytes - same["qlora"].weights_bytes
    assert saving == pytest.approx(linear_weights * (2 - 0.5 - (8 / 64 + 32 / 16384) / 8), abs=1)
    assert same["qlora"].activations_bytes == same["lora"].activations_bytes
    assert same["lora"].total_bytes - same["qlora"].total_bytes == pytest.approx(saving, abs=1)
    fp32 = by_method(plan(cfg, batch_size=1, seq_len=1024, dtype="float32", gpu_memory="80GB", methods=["full"]))
    assert fp32["full"].fits is False and fp32["full"].max_batch_size is None  # 16 B/param = 128 GB


def test_tied_embeddings_full_fine_tuning_end_of_backward():
    """Llama-3.2-1B shapes (tied embeddings), bf16 on CUDA, batch 1 x 512: the peak is the end of backward, where
    the embedding's gradient (V x h) and its sum with the LM head's gradient sit beside all the others; fused
    AdamW adds nothing (bf16 AdamW, as measured). Measured on an H200: 10.25 GiB (bench/results/plan_vs_measured_cuda_1b.json)."""
    cfg = {"model_type": "llama", "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
           "num_key_value_heads": 8, "intermediate_size": 8192, "vocab_size": 128256, "tie_word_embeddings": True}
    est = by_method(plan(cfg, batch_size=1, seq_len=512, methods=["full"], fused_loss=False,
                         master_weights=False))["full"]
    layer = 2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 8192 + 2 * 2048
    params = 128256 * 2048 + 16 * layer + 2048
    assert est.params_trainable == params == 1_235_814_400
    weights_states_grads = (2 + 4 + 2) * params
    assert est.peak_phase == "optimizer step"
    assert est.peak_tensor_bytes == weights_states_grads + 2 * 2 * 128256 * 2048 + 64 * 2**20
    assert est.peak_tensor_bytes / 2**30 == pytest.approx(10.25, rel=0.01)


def test_json_and_table():
    result = plan(LLAMA, batch_size=2, seq_len=16, gpu_memory="24GiB")
    again = PlanResult.model_validate(json.loads(result.model_dump_json()))
    assert again == result and len(result.strategies) == 9
    table = render_plan(result)
    headers = [c.header for c in table.columns]
    assert table.row_count == 9 and "max batch" in headers and "total GiB" in headers
    assert "bitfit: the model has no biases" in table.caption


def test_packaged_alias_is_planned_from_its_config_and_unknown_aliases_fail():
    result = plan("minilm-l6", batch_size=8, seq_len=128, methods=["full", "lora"])
    assert result.model_type == "bert" and result.task == "classification"
    assert result.params_total == 22_713_216 + 384 * 2 + 2  # all-MiniLM-L6-v2 + a 2-class head
    with pytest.raises(ConfigError, match="model alias 'no-such-alias' is unknown"):
        plan("no-such-alias")


@pytest.mark.parametrize("text,expected", [
    ("80GB", 80 * 10**9), ("24GiB", 24 * 2**30), ("16000MB", 16 * 10**9), (" 1.5 TB ", 15 * 10**11),
    ("512mib", 512 * 2**20), ("4096", 4096), (1024, 1024), ("2G", 2 * 10**9),
])
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["eighty", "80XB", "-5GB", "0GB", "", "GB", 0])
def test_parse_memory_rejects(text):
    with pytest.raises(ConfigError, match="gpu-memory"):
        parse_memory(text)


def test_bad_model_inputs_name_the_file_and_key(tmp_path):
    with pytest.raises(ArtifactError, match="no_such_dir"):
        plan(str(tmp_path / "no_such_dir"))
    empty = tmp_path / "empty_model"
    empty.mkdir()
    with pytest.raises(ArtifactError, match="no config.json"):
        plan(empty)
    broken = tmp_path / "config.json"
    broken.write_text('{"model_type": "llama", "hidden_size": 64,,}')
    with pytest.raises(ConfigError, match=r"config.json: not valid JSON \(.* line 1 "):
        plan(broken)
    broken.write_text(json.dumps({k: v for k, v in LLAMA.items() if k != "hidden_size"}))
    with pytest.raises(ConfigError, match="missing key 'hidden_size'"):
        plan(broken)
    broken.write_text(json.dumps({"model_type": "gpt2", "n_layer": 2, "n_head": 2, "vocab_size": 10}))
    with pytest.raises(ConfigError, match="missing key 'n_embd'"):
        plan(broken)
    broken.write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(ConfigError, match="missing key 'model_type'"):
        plan(broken)
    broken.write_text(json.dumps({"model_type": "no-such-arch", "hidden_size": 64}))
    with pytest.raises(ConfigError, match="model_type"):
        plan(broken)


def test_bad_settings_are_one_line_config_errors():
    with pytest.raises(ConfigError, match="unknown key 'bottlenek'.*did you mean 'bottleneck_size'"):
        plan(LLAMA, method_options={"bottlenek": 4})
    with pytest.raises(ConfigError, match="key 'r'"):
        plan(LLAMA, method_options={"r": 0})
    with pytest.raises(ConfigError, match="seq_len = 0"):
        plan(LLAMA, seq_len=0)
    with pytest.raises(ConfigError, match="'lorra'.*did you mean 'lora'"):
        plan(LLAMA, methods=["lorra"])
    with pytest.raises(ConfigError, match="dtype 'int8'"):
        plan(LLAMA, dtype="int8")
    with pytest.raises(ConfigError, match="target_modules.*matched no module"):
        plan(LLAMA, methods=["lora"], method_options={"target_modules": ["nope"]})


def test_every_registered_method_has_planner_terms():
    from tunelab.measure.plan_methods import TERMS
    from tunelab.methods import all_methods

    assert set(all_methods()) <= set(TERMS), "a registered method needs one entry in plan_methods.TERMS"
    assert set(TERMS) <= set(all_methods()), "a planner entry names no registered method"


def test_options_are_each_methods_own_and_set_for_targets_one_method():
    plain = by_method(plan(LLAMA, batch_size=2, seq_len=16, dtype="float32", device="cpu"))
    both = by_method(plan(LLAMA, batch_size=2, seq_len=16, dtype="float32", device="cpu",
                          method_options={"dropout": 0.1}))  # as `train --set dropout=0.1`: lora, dora, qlora
    one = by_method(plan(LLAMA, batch_size=2, seq_len=16, dtype="float32", device="cpu",
                         options_for={"lora": {"dropout": 0.1}}))
    # dropout keeps a mask and the dropped input per target instead of sharing the block input
    assert one["lora"].activations_bytes > plain["lora"].activations_bytes
    assert one["lora"] == both["lora"] and one["dora"] == plain["dora"] and both["dora"] != plain["dora"]
    assert both["full"] == plain["full"]  # full has no dropout: --set skips it
    adapter = by_method(plan(LLAMA, methods=["adapter"], options_for={"adapter": {"variant": "pfeiffer",
                                                                                  "bottleneck_size": 8}}))
    assert adapter["adapter"].params_trainable == L * (2 * H * 8 + 8 + H)
    bitfit = by_method(plan(LLAMA, methods=["bitfit"], method_options={"include_norms": True}))["bitfit"]
    assert bitfit.params_trainable == L * 2 * H + H and not bitfit.notes  # asked for: no default note
    with pytest.raises(ConfigError, match="--set-for names method 'dora', which is not planned"):
        plan(LLAMA, methods=["lora"], options_for={"dora": {"r": 4}})
    with pytest.raises(ConfigError, match="method 'lora': key 'dropout'"):
        plan(LLAMA, options_for={"lora": {"dropout": 2}})
    unmodelled = by_method(plan(LLAMA, methods=["prefix"], method_options={"prefix_projection": True}))
    assert "prefix_projection (not modelled)" in unmodelled["prefix"].notes[-1]


def test_compare_prediction_honours_set_for_dropout(tiny_dirs):
    from tunelab.config import build_config
    from tunelab.measure.compare import _predicted_memory

    def predicted(options):
        cfg = build_config({}, dict(model=str(tiny_dirs["llama"]), method="lora", method_options=options,
                                    batch_size=2, seq_len=16, device="cpu", output="unused"))
        return _predicted_memory(cfg, [])

    with_dropout = plan(tiny_dirs["llama"], batch_size=2, seq_len=16, device="cpu", methods=["lora"],
                        options_for={"lora": {"dropout": 0.1}}).strategies[0].total_bytes
    assert predicted({"dropout": 0.1}) == with_dropout > predicted({})


def test_compare_prediction_under_nproc_is_per_gpu_for_the_strategy_the_run_took(tiny_dirs):
    """`compare --nproc 2`: the prediction is one GPU's, for the strategy in the run's run.json."""
    from tunelab.config import build_config
    from tunelab.measure.compare import _predicted_memory

    cfg = build_config({}, dict(model=str(tiny_dirs["llama"]), method="full", batch_size=2, seq_len=16,
                                device="cpu", output="unused"))
    for strategy in ("ddp", "fsdp"):
        expected = plan(tiny_dirs["llama"], batch_size=2, seq_len=16, device="cpu", methods=["full"], nproc=2,
                        strategy=strategy).strategies[0].peak_tensor_bytes
        assert _predicted_memory(cfg, [], 2, strategy) == expected
    assert _predicted_memory(cfg, [], 2, "ddp") != _predicted_memory(cfg, [], 2, "fsdp")
    assert _predicted_memory(cfg, []) == plan(tiny_dirs["llama"], batch_size=2, seq_len=16, device="cpu",
                                             methods=["full"]).strategies[0].peak_tensor_bytes


# --- against PyTorch itself: saved tensors and the allocator peak of real steps on CPU ------------------

def saved_activation_bytes(model, **inputs) -> int:
    """Bytes of the tensors autograd saves in one forward, parameters excluded (shared storages once)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**inputs)
    return sum(seen.values())


GPT2 = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 500, "n_positions": 64}
BERT = {"model_type": "bert", "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "vocab_size": 500, "num_labels": 3}


@pytest.mark.parametrize("kind,config", [
    ("full", LLAMA), ("lora", LLAMA), ("adapter", LLAMA), ("full", GPT2), ("lora", GPT2), ("full", BERT),
    ("prompt", BERT),
])
def test_activation_formula_matches_saved_tensors(kind, config):
    """Against every tensor autograd saves in one forward on CPU (fp32; GPT-2 and BERT use dropout, so SDPA
    takes its math path and keeps the (s, s) scores)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from tunelab.methods import get_method

    torch.manual_seed(0)
    auto = AutoModelForSequenceClassification if config["model_type"] == "bert" else AutoModelForCausalLM
    model = auto.from_config(AutoConfig.for_model(**config)).train()
    if kind != "full":
        impl = get_method(kind)
        impl.inject(model, impl.Options(), "default")
    b, s = 2, 32
    ids = torch.randint(0, config["vocab_size"], (b, s))
    measured = saved_activation_bytes(model, input_ids=ids) + 16 * b * s  # + attention mask, labels (int64)
    planned = by_method(plan(config, batch_size=b, seq_len=s, dtype="float32", device="cpu", methods=[kind]))
    assert planned[kind].activations_bytes == pytest.approx(measured, rel=0.03)


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_cuda_bf16_autocast_activations_match_saved_tensors_under_cpu_autocast(kind):
    """tunelab on CUDA runs a bf16 model under bf16 autocast. For Llama blocks CPU autocast casts the same ops
    (RMSNorm upcasts by hand, matmuls go bf16), so the CUDA prediction can be checked here: LoRA's fp32 adapter
    input becomes one bf16 copy per target."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunelab.methods import get_method

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**LLAMA), dtype=torch.bfloat16).train()
    if kind == "lora":
        lora = get_method("lora")
        lora.inject(model, lora.Options(), "default")
    b, s = 2, 32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        measured = saved_activation_bytes(model, input_ids=torch.randint(0, V, (b, s))) + 16 * b * s
    planned = by_method(plan(LLAMA, batch_size=b, seq_len=s, dtype="bfloat16", device="cuda", methods=[kind]))
    assert planned[kind].activations_bytes == pytest.approx(measured, rel=0.03)


def measured_peak(model, b: int, s: int, steps: int = 2, fused: bool = False) -> int:
    """Weights + the CPU allocator's peak over `steps` steps of tunelab's own loop code (profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile

    from tunelab.measure.plan_model import storage_bytes
    from tunelab.train.loop import accumulate_window

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    base = storage_bytes(model)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(steps):
            ids = torch.randint(0, model.config.vocab_size, (b, s))
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
            accumulate_window(model, [batch], "causal-lm", fused=fused)
            opt.step()
            opt.zero_grad(set_to_none=True)
    running = peak = 0
    for e in sorted(prof.profiler.kineto_results.events(), key=lambda e: e.start_ns()):
        if e.name() == "[memory]":
            running += e.nbytes()
            peak = max(peak, running)
    return base + peak


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("method,ckpt", [("full", False), ("lora", False), ("lora", True), ("qlora", False),
                                         ("dora", False), ("adapter", False), ("prompt", True)])
def test_predicted_peak_within_5_percent_of_a_measured_cpu_step(method, ckpt, fused):
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunelab.methods import get_method
    from tunelab.methods.base import mark_trainable
    from tunelab.train.setup import enable_gradient_checkpointing

    config = {**LLAMA, "hidden_size": 128, "intermediate_size": 344, "vocab_size": 2000}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config)).train()
    impl = get_method(method)
    impl.inject(model, impl.Options(), "default")
    mark_trainable(model, impl.parameters(model, "default"))
    if ckpt:  # after inject, as tunelab's run setup does
        enable_gradient_checkpointing(model)
    b, s = 4, 64
    predicted = by_method(plan(config, batch_size=b, seq_len=s, dtype="float32", device="cpu",
                               gradient_checkpointing=ckpt, methods=[method], fused_loss=fused))[method]
    assert predicted.peak_tensor_bytes == pytest.approx(measured_peak(model, b, s, fused=fused), rel=0.05)


def test_nproc_gives_the_per_gpu_peak_under_fsdp2_by_hand():
    """FSDP2 on N GPUs: 1/N of weights, gradients and AdamW states, plus the gathered root group (embeddings,
    final norm, head) and two blocks, plus one block's gradient and its fp32 copy (`measure/plan_fsdp.py`)."""
    kw = dict(batch_size=2, seq_len=16, dtype="bfloat16", device="cuda", master_weights=False)  # bf16 AdamW
    one = by_method(plan(LLAMA, methods=["full", "lora"], **kw))
    two = plan(LLAMA, methods=["full", "lora", "qlora"], nproc=2, strategy="fsdp", **kw)
    est = by_method(two)
    outside = 2 * V * H + H  # untied embeddings and head, final norm
    block = (hand_llama_params() - outside) / L
    gathered = (outside + 2 * block) * 2
    assert two.nproc == 2 and est["full"].params_trainable == one["full"].params_trainable
    assert est["full"].weights_bytes == round(one["full"].weights_bytes / 2 + gathered + block * (2 + 4))
    assert est["full"].optimizer_bytes == pytest.approx(one["full"].optimizer_bytes / 2, abs=8)
    assert est["full"].gradients_bytes == pytest.approx(one["full"].gradients_bytes / 2, abs=4)
    assert est["full"].activations_bytes == one["full"].activations_bytes  # one GPU's micro-batch
    assert est["lora"].optimizer_bytes == pytest.approx(one["lora"].optimizer_bytes / 2, abs=8)
    assert not est["qlora"].supported and "FSDP2" in est["qlora"].notes[-1]
    # two blocks of two are the whole model: sharding a tiny model saves nothing; an 8B one it does
    assert est["full"].total_bytes > one["full"].total_bytes
    cfg = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256}
    totals = [by_method(plan(cfg, batch_size=1, seq_len=1024, methods=["full"], nproc=n,
                             strategy="fsdp"))["full"].total_bytes for n in (1, 2, 8)]
    assert totals[0] > totals[1] > totals[2] and totals[2] < totals[0] / 2



def test_fsdp2_blocks_that_keep_their_gathered_weights_hold_every_block():
    """`reshard_after_forward`: never holds every block gathered (in the run dtype) from the end of the forward
    into the backward, not at the optimizer step (each block frees its weights after its backward); auto does so
    where the model in the run dtype takes at most 15% of --gpu-memory, as train decides."""
    layers = 6
    deep = {**LLAMA, "num_hidden_layers": layers}
    kw = dict(batch_size=2, seq_len=16, dtype="bfloat16", device="cuda", methods=["full"], nproc=2, strategy="fsdp")
    block = 2 * H * H + 2 * H * KV_DIM + 3 * H * I + 2 * H  # q, o; k, v; gate, up, down; two norms
    extra = (layers - 2) * block * 2
    info, rt = describe_model(deep), runtime("cuda", 2)
    st = build_strategy("full", info, method_options_for(["full"])["full"], rt)
    base, keep = sharded(st, info, 2), sharded(st, info, 2, keep_gathered=True)
    assert keep.weights_bytes == base.weights_bytes and keep.gathered_bytes == extra and base.gathered_bytes == 0
    for ckpt in (False, True):
        kept, plain = phases(keep, info, rt, 2, 16, ckpt), phases(base, info, rt, 2, 16, ckpt)
        assert kept["optimizer step"] == plain["optimizer step"]
        assert all(kept[k] == pytest.approx(plain[k] + extra) for k in kept if k != "optimizer step")
    planned = {r: by_method(plan(deep, reshard_after_forward=r, **kw))["full"] for r in ("always", "never")}
    assert "every block" in planned["never"].notes[-1] and "two blocks" in planned["always"].notes[-1]
    whole = plan(deep, **kw).params_total * 2  # the model in bf16
    edge = whole / 0.15  # ... is exactly 15% of this GPU
    assert "every block" in by_method(plan(deep, gpu_memory=int(edge) + 1, **kw))["full"].notes[-1]
    assert "two blocks" in by_method(plan(deep, gpu_memory=int(edge) - 1, **kw))["full"].notes[-1]
    with pytest.raises(ConfigError, match="reshard_after_forward 'sometimes': expected auto, always or never"):
        plan(deep, reshard_after_forward="sometimes", **kw)


def test_master_weights_add_fp32_copies_and_moments_by_hand():
    """`--master-weights` on a bf16 model: one process keeps bf16 weights and gradients plus fp32 masters and
    moments (12 bytes a trained weight) and an fp32 gradient chunk at the step; FSDP2 holds the trained weights,
    gradients and moments in fp32 shards. Adapter methods (already fp32) are unchanged."""
    kw = dict(batch_size=2, seq_len=16, dtype="bfloat16", device="cuda", methods=["full", "lora"])
    plain, master = by_method(plan(LLAMA, master_weights=False, **kw)), by_method(plan(LLAMA, **kw))
    n = plain["full"].params_trainable
    assert master["full"].weights_bytes == plain["full"].weights_bytes == 2 * n
    assert master["full"].gradients_bytes == 2 * n
    assert plain["full"].optimizer_bytes == 2 * 2 * n and master["full"].optimizer_bytes == (4 + 8) * n
    assert master["full"].total_bytes >= plain["full"].total_bytes + 8 * n  # masters + fp32 moments are held
    assert master["lora"] == plain["lora"]
    two_plain = by_method(plan(LLAMA, master_weights=False, nproc=2, strategy="fsdp", **kw))
    two = by_method(plan(LLAMA, master_weights=True, nproc=2, strategy="fsdp", **kw))
    assert two["full"].gradients_bytes == pytest.approx(4 * n / 2, abs=4)
    assert two["full"].optimizer_bytes == pytest.approx(8 * n / 2, abs=8)
    assert two["full"].weights_bytes == pytest.approx(two_plain["full"].weights_bytes + 2 * n / 2, abs=4)
    fp32 = by_method(plan(LLAMA, batch_size=2, seq_len=16, dtype="float32", device="cuda", methods=["full"],
                          master_weights=True))
    assert fp32["full"].optimizer_bytes == 2 * 4 * n  # an fp32 model has nothing to copy


def test_nproc_plans_the_strategy_train_would_take():
    """`--strategy auto` as train decides it: DDP (a whole copy plus DDP's gradient buckets) when the replicated
    state fits half the GPU, else FSDP2; without --gpu-memory by parameter count; qlora always DDP."""
    kw = dict(batch_size=2, seq_len=16, dtype="bfloat16", device="cuda", methods=["full", "lora", "qlora"])
    one = by_method(plan(LLAMA, **kw))
    auto = by_method(plan(LLAMA, nproc=2, gpu_memory="80GB", **kw))
    assert {m: e.distributed for m, e in auto.items()} == {"full": "ddp", "lora": "ddp", "qlora": "ddp"}
    for m in ("full", "lora"):
        assert auto[m].weights_bytes == one[m].weights_bytes + one[m].gradients_bytes  # + the buckets
        assert auto[m].activations_bytes == one[m].activations_bytes and "DDP on 2 GPUs" in auto[m].notes[-1]
    assert auto["qlora"].supported  # FSDP2 refuses NF4; auto replicates it
    assert by_method(plan(LLAMA, nproc=2, **kw))["full"].distributed == "ddp"  # no budget: under 1B parameters
    tight = by_method(plan(LLAMA, nproc=2, gpu_memory=one["full"].weights_bytes, **kw))
    assert tight["full"].distributed == "fsdp" and tight["qlora"].distributed == "ddp"
    cfg = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256}
    big = by_method(plan(cfg, batch_size=4, seq_len=2048, methods=["full", "lora"], nproc=2, gpu_memory="141GB",
                         gradient_checkpointing=True))
    assert big["full"].distributed == "fsdp" and big["lora"].distributed == "ddp"  # as measured on two H200s
    with pytest.raises(ConfigError, match="strategy 'zero3': expected auto, fsdp or ddp"):
        plan(LLAMA, nproc=2, strategy="zero3", **kw)
