"""Chat templates for base models that have none: a Jinja file, or one shipped with tunelab by name.

`--chat-template chatml` (or `chat_template: path/to/template.jinja` in a run config) sets the tokenizer's
template before the data is encoded, so a base model can be chat-tuned on `messages`, ShareGPT or Alpaca data.
Each shipped template renders a conversation turn by turn (what the loss masking of `formats.py` needs) and
ends an assistant turn with a marker the model learns to emit.
"""

from __future__ import annotations

from pathlib import Path

from tunelab.errors import ConfigError, closest

TEMPLATES = {
    # ChatML (Qwen, SmolLM2 and many others): <|im_start|>role\ncontent<|im_end|>\n
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
        "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    # Alpaca's prompt (LLaMA-Factory's `alpaca` template): the reply ends with the tokenizer's EOS
    "alpaca": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{% else %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
}


def resolve_chat_template(spec: str) -> str:
    """The Jinja source of `spec`: a shipped template's name (`chatml`, `alpaca`) or a path to a Jinja file.

    A name wins over a relative path of the same spelling. Errors (`ConfigError`) name the path or the names.
    """
    if spec in TEMPLATES:
        return TEMPLATES[spec]
    path = Path(spec).expanduser()
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "not found"
        raise ConfigError(f"chat_template {spec!r}: {what}; expected a Jinja file or one of "
                          f"{', '.join(TEMPLATES)}{closest(spec, TEMPLATES)}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: chat template unreadable ({type(e).__name__})") from None
    if not text.strip():
        raise ConfigError(f"{path}: chat template is empty; expected Jinja source")
    return text
