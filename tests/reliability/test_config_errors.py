"""RELIABILITY.md cases 16-17: configuration errors are one line, suggest the closest key, and come before any
model loads (the CLI is run in-process with a model path that does not exist, so any load would fail otherwise)."""

from __future__ import annotations

import pytest

from tunelab.cli import main
from tunelab.config import build_config, parse_set
from tunelab.errors import ConfigError

MISSING_MODEL = "/nonexistent/model-dir"


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def test_case16_unknown_cli_option_suggests_closest(capsys):
    code, err = run_cli(capsys, "train", "--max-step", "3")
    assert code == 2
    assert err.count("\n") == 0
    assert "--max-steps" in err


def test_case16_unknown_config_key_suggests_closest(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("batch_sise: 4\n")
    code, err = run_cli(capsys, "train", "--config", str(cfg), "--model", MISSING_MODEL)
    assert code == 2 and err.count("\n") == 0
    assert "batch_sise" in err and "batch_size" in err and str(cfg) in err


def test_case16_unknown_method_option_suggests_closest(capsys):
    code, err = run_cli(capsys, "train", "--method", "lora", "--set", "alpah=4", "--model", MISSING_MODEL)
    assert code == 2 and "'alpah'" in err and "'alpha'" in err


def test_case16_method_option_typo_in_yaml_names_the_file_and_key(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("method: lora\nmethod_options:\n  rr: 8\n")
    code, err = run_cli(capsys, "train", "--config", str(cfg), "--model", MISSING_MODEL)
    assert code == 2 and err.count("\n") == 0
    assert err.startswith(f"error: {cfg}: method_options for method 'lora': unknown key 'rr' (did you mean 'r'?)")
    assert "--set" not in err
    cfg.write_text("method: lora\nmethod_options:\n  r: -1\n")  # a bad value names the file too
    code, err = run_cli(capsys, "train", "--config", str(cfg), "--model", MISSING_MODEL)
    assert code == 2 and err.startswith(f"error: {cfg}: method_options for method 'lora': key 'r'"), err
    code, err = run_cli(capsys, "train", "--config", str(cfg), "--model", MISSING_MODEL, "--set", "r=4")
    assert code != 2 or "method_options" not in err, err  # --set wins over the file's value, key by key


def test_case16_yaml_method_options_merge_with_set(tmp_path):
    cfg = build_config({"method": "lora", "method_options": {"r": 4, "alpha": 8}},
                       {"method_options": parse_set(["alpha=2"])}, where="run.yaml")
    assert cfg.method_options == {"r": 4, "alpha": 2}


@pytest.mark.parametrize("argv, expect", [
    (["eval", "--dtype", "float32"], "error: unknown option --dtype for 'tunelab eval' (its options: "
                                     "tunelab eval --help)"),  # no longer "did you mean '--adapter'"
    (["eval", "--adaptr", "x"], "error: unknown option --adaptr (did you mean '--adapter'?)"),
    (["train", "--dtyp", "float32"], "error: unknown option --dtyp (did you mean '--dtype'?)"),
    (["merge", "--out", "x"], "error: unknown option --out (did you mean '--output'?)"),
])
def test_case16_closest_option_is_close_without_the_dashes(capsys, argv, expect):
    code, err = run_cli(capsys, *argv)
    assert code == 2 and err == expect


def test_closest_ignores_option_dashes():
    from tunelab.errors import closest

    assert closest("--dtype", ["--adapter", "--model"]) == ""
    assert closest("--dtype", ["--adapter", "--dtype-x"]) == " (did you mean '--dtype-x'?)"
    assert closest("rr", ["r", "alpha"]) == " (did you mean 'r'?)"


@pytest.mark.parametrize("argv, needle", [
    (["--method", "lora", "--set", "r=0"], "r"),
    (["--method", "lora", "--set", "r=-2"], "r"),
    (["--lr", "-0.1"], "lr"),
    (["--seq-len", "0"], "seq_len"),
    (["--method", "lroa"], "lora"),
    (["--task", "regression"], "task"),
    (["--batch-size", "0"], "batch_size"),
])
def test_case17_invalid_values_fail_before_model_loads(capsys, argv, needle):
    code, err = run_cli(capsys, "train", "--model", MISSING_MODEL, *argv)
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 0
    assert needle in err
    assert MISSING_MODEL not in err  # failed on the config, not on loading the model


def test_config_yaml_not_a_mapping(tmp_path):
    from tunelab.config import load_yaml

    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="bad.yaml: expected a mapping"):
        load_yaml(bad)


def test_parse_set_values_are_typed():
    assert parse_set(["r=16", "rslora=true", "target_modules=[q_proj, v_proj]", "init=gaussian"]) == {
        "r": 16, "rslora": True, "target_modules": ["q_proj", "v_proj"], "init": "gaussian"}
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_set(["r"])


def test_result_hash_changes_with_result_keys_only():
    a = build_config({}, {"method": "lora", "output": "a"})
    b = build_config({}, {"method": "lora", "output": "b"})
    c = build_config({}, {"method": "lora", "output": "a", "seed": 1})
    assert a.result_hash() == b.result_hash()
    assert a.result_hash() != c.result_hash()
