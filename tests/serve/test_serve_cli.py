"""`tunelab serve`'s flags and `--config` YAML, and `tunelab generate` / `tunelab chat` (the serving engine, no
server): each flag reaches the server, a YAML typo names the file and key, and the terminal commands print what
the engine generates."""

from __future__ import annotations

import io

import pytest
from serve.helpers import PROMPTS, adapter_root, base_dir, one_thread  # noqa: F401  (fixtures)

from tunelab import cli
from tunelab.serve import server


@pytest.fixture
def captured(monkeypatch):
    """What `tunelab serve` would start: (model, adapters, keyword arguments) per call."""
    seen = []
    monkeypatch.setattr(server, "serve", lambda model, adapters, **kw: seen.append((model, adapters, kw)))
    return seen


def test_serve_flags_reach_the_server(captured, adapter_root):
    argv = ["serve", "--model", "m", "--adapter", f"a={adapter_root / 'a'}", "--served-model-name", "org/base",
            "--dtype", "bfloat16", "--device", "cpu", "--slot-wait", "2.5", "--chat-template", "chatml",
            "--port", "8123"]
    assert cli.main(argv) == 0
    [(model, adapters, kw)] = captured
    assert model == "m" and adapters == {"a": adapter_root / "a"}
    assert {k: kw[k] for k in ("served_model_name", "dtype", "device", "slot_wait_s", "chat_template", "port",
                               "host", "max_adapters")} == {
        "served_model_name": "org/base", "dtype": "bfloat16", "device": "cpu", "slot_wait_s": 2.5,
        "chat_template": "chatml", "port": 8123, "host": "127.0.0.1", "max_adapters": 8}


def test_serve_config_yaml_with_flags_over_it(captured, adapter_root, tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text(f"model: m\nadapters:\n  a: {adapter_root / 'a'}\nport: 9000\nmax_adapters: 3\n"
                      "served_model_name: base\ndtype: float32\n")
    assert cli.main(["serve", "--config", str(config), "--port", "9001",
                     "--adapter", f"b={adapter_root / 'b'}"]) == 0
    [(model, adapters, kw)] = captured
    assert model == "m" and set(adapters) == {"a", "b"}
    assert (kw["port"], kw["max_adapters"], kw["served_model_name"], kw["dtype"]) == (9001, 3, "base", "float32")


@pytest.mark.parametrize("text, words", [
    ("model: m\nprot: 9000\n", ["serve.yaml", "'prot'", "port"]),
    ("model: m\nmax_adapters: 0\n", ["serve.yaml", "max_adapters", "greater than or equal to 1"]),
    ("port: 9000\n", ["serve.yaml", "no model"]),
    ("model: m\nadapters: [a]\n", ["serve.yaml", "adapters", "mapping"]),
    ("model: m\ndtype: bfloat\n", ["serve.yaml", "dtype", "bfloat16"]),
])
def test_serve_config_errors_name_the_file_and_key(captured, tmp_path, capsys, text, words):
    config = tmp_path / "serve.yaml"
    config.write_text(text)
    assert cli.main(["serve", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and all(w in err for w in words), err
    assert captured == []


def test_generate_prints_what_the_engine_generates(base_dir, adapter_root, tokenizer, monkeypatch, capsys):
    from tunelab.serve.request import GenerationRequest
    from tunelab.serve.service import build_service

    service = build_service(base_dir, {"a": adapter_root / "a"})
    try:
        key = service.registry.acquire("a")
        [want] = service.engine.generate([GenerationRequest(service.encode_prompt(PROMPTS[0]), adapter=key,
                                                            max_tokens=8, temperature=0)])
    finally:
        service.close()
    argv = ["generate", "--model", str(base_dir), "--adapter", str(adapter_root / "a"), "--prompt", PROMPTS[0],
            "--max-tokens", "8", "--device", "cpu"]
    assert cli.main(argv) == 0
    assert capsys.readouterr().out == want.text + "\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(PROMPTS[0]))  # the prompt from stdin
    assert cli.main(argv[:5] + argv[7:]) == 0
    assert capsys.readouterr().out == want.text + "\n"


def test_chat_answers_each_line_with_the_conversation_so_far(base_dir, monkeypatch, capsys):
    from tunelab.serve.request import GenerationRequest
    from tunelab.serve.service import build_service

    service = build_service(base_dir)
    try:
        first = [{"role": "user", "content": "hi"}]
        [one] = service.engine.generate([GenerationRequest(service.encode_chat(first), max_tokens=6)])
        second = first + [{"role": "assistant", "content": one.text}, {"role": "user", "content": "more"}]
        [two] = service.engine.generate([GenerationRequest(service.encode_chat(second), max_tokens=6)])
    finally:
        service.close()
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\nmore\n"))
    assert cli.main(["chat", "--model", str(base_dir), "--max-tokens", "6", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == f"{one.text}\n{two.text}\n"


def test_generate_with_a_missing_adapter_is_one_line(base_dir, tmp_path, capsys):
    assert cli.main(["generate", "--model", str(base_dir), "--adapter", str(tmp_path / "none"), "--prompt",
                     "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "none" in err
