"""Turn rows into training examples. The columns decide the format:

- `text` (causal-lm): loss on every token. The tokenizer's own special tokens are added (e.g. BOS) and EOS is
  appended, so packed documents stay separated.
- `prompt` + `response`: loss on the response tokens only; EOS is appended to the response. With a chat
  template, the prompt is rendered as one user turn plus the generation prompt (exactly what the model sees when
  it is asked to reply); without one, the prompt is followed by a newline and the response comes next.
- `messages` (a list of `{role, content}`): the chat template renders the conversation; loss falls on the
  assistant turns only (their content and the template's end-of-turn marker).
- `text` + `label` (classification): one label per text; labels may be strings or integers.

The two dialects LLaMA-Factory users write are read as the formats above:
- Alpaca, `instruction` + `output` (optional `input`, `system`, `history`): the prompt is the instruction, then a
  newline and the input when there is one; a row with a system prompt or history becomes a conversation.
- ShareGPT, `conversations` (a list of `{from, value}`, `from` one of human, gpt, system; optional `system`
  column): a conversation, loss on the gpt turns.

An example is `{"input_ids", "labels"}` (labels aligned with input_ids, -100 where no loss, not shifted) or
`{"input_ids", "label"}`; the label stays a string here and becomes an index once the label list is known.
"""

from __future__ import annotations

import json
from typing import Any

from jinja2 import TemplateError

from tunelab.errors import DataError

IGNORE_INDEX = -100  # label value that carries no loss (torch's cross-entropy default)

CAUSAL_FORMATS = {"messages": ("messages",), "sharegpt": ("conversations",), "prompt-response": ("prompt", "response"),
                  "alpaca": ("instruction", "output"), "text": ("text",)}
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
CLASSIFICATION_COLUMNS = ("text", "label")


def detect_format(columns: list[str], task: str, name: str) -> str:
    """The data format named by a table's columns; DataError listing the columns found and expected."""
    found = ", ".join(columns) or "none"
    if task == "classification":
        if all(c in columns for c in CLASSIFICATION_COLUMNS):
            return "classification"
        raise DataError(f"{name}: columns found: {found}; expected text and label for task classification")
    for fmt, needed in CAUSAL_FORMATS.items():  # most specific first
        if all(c in columns for c in needed):
            return fmt
    raise DataError(f"{name}: columns found: {found}; expected one of: text | prompt + response | messages | "
                    f"instruction + output (Alpaca) | conversations (ShareGPT) for task causal-lm")


def field(row: dict, name: str, where: str, types: tuple[type, ...] = (str,)) -> Any:
    """`row[name]`, checked; DataError naming the row and field when missing or of the wrong type."""
    if name not in row:
        raise DataError(f"{where}: missing field '{name}'")
    value = row[name]
    if not isinstance(value, types) or isinstance(value, bool):
        expected = " or ".join(t.__name__ for t in types)
        raise DataError(f"{where}: field '{name}' expected {expected}, found {type(value).__name__}")
    return value


def encode_row(fmt: str, row: dict, where: str, tokenizer) -> dict | None:
    """One row as an example of unlimited length, or None when its text is empty (skipped and counted)."""
    if fmt == "text":
        return encode_text(field(row, "text", where), tokenizer)
    if fmt == "prompt-response":
        return encode_prompt_response(field(row, "prompt", where), field(row, "response", where), tokenizer)
    if fmt == "messages":
        return encode_messages(messages_field(row, where), tokenizer, where)
    if fmt == "sharegpt":
        return encode_messages(sharegpt_messages(row, where), tokenizer, where)
    if fmt == "alpaca":
        return encode_alpaca(row, where, tokenizer)
    if fmt == "classification":
        text, label = field(row, "text", where), field(row, "label", where, (str, int))
        if not text.strip():
            return None
        return {"input_ids": token_ids(tokenizer, text), "label": str(label)}
    raise ValueError(f"unknown format {fmt!r}")


def token_ids(tokenizer, text: str, special: bool = True) -> list[int]:
    """Token ids of `text`, with the tokenizer's own special tokens (BOS, [CLS]/[SEP]) when `special`."""
    # verbose=False: long rows are expected here (they are cut to seq_len afterwards), so no length warning
    return tokenizer(text, add_special_tokens=special, verbose=False)["input_ids"]


def _with_eos(ids: list[int], tokenizer) -> list[int]:
    eos = tokenizer.eos_token_id
    return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids


def encode_text(text: str, tokenizer) -> dict | None:
    """Plain language modelling: every token is a target."""
    if not text.strip():
        return None
    ids = _with_eos(token_ids(tokenizer, text), tokenizer)
    return {"input_ids": ids, "labels": list(ids)}


def prompt_ids(prompt: str, tokenizer) -> list[int]:
    """The prompt as the model sees it before replying: chat template (user turn + generation prompt) or text + newline."""
    if tokenizer.chat_template:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True)
        return token_ids(tokenizer, rendered, special=False)  # the template holds its special tokens
    return token_ids(tokenizer, prompt + "\n")


def encode_prompt_response(prompt: str, response: str, tokenizer) -> dict | None:
    """Instruction tuning: loss on the response tokens and the appended EOS only."""
    if not response.strip():
        return None
    p_ids = prompt_ids(prompt, tokenizer)
    r_ids = _with_eos(token_ids(tokenizer, response, special=False), tokenizer)
    return {"input_ids": p_ids + r_ids, "labels": [IGNORE_INDEX] * len(p_ids) + r_ids}


def messages_field(row: dict, where: str) -> list[dict[str, str]]:
    """The `messages` list, checked: a list of dicts with string `role` and `content` (CSV cells hold JSON)."""
    messages = _json_list(row, "messages", where)  # CSV stores the list as JSON text
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"{where}: field 'messages[{i}]' expected a dict with role and content, "
                            f"found {type(message).__name__}")
        for key in ("role", "content"):
            field(message, key, f"{where} messages[{i}]")
    return messages


def _optional(row: dict, name: str, where: str, types: tuple[type, ...] = (str,)) -> Any:
    """`row[name]` checked as `field` does, or None when the column is absent or null (CSV: empty)."""
    return None if row.get(name) in (None, "") else field(row, name, where, types)


def _json_list(row: dict, name: str, where: str) -> list:
    """A list-valued field; CSV cells hold it as JSON text."""
    value = field(row, name, where, (list, str))
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            raise DataError(f"{where}: field '{name}' expected a JSON list, found text") from None
    return field({name: value}, name, where, (list,))


def sharegpt_messages(row: dict, where: str) -> list[dict[str, str]]:
    """ShareGPT's `conversations` as `{role, content}` messages; the optional `system` column leads them."""
    messages = []
    system = _optional(row, "system", where)
    if system:
        messages.append({"role": "system", "content": system})
    for i, turn in enumerate(_json_list(row, "conversations", where)):
        at = f"{where} conversations[{i}]"
        if not isinstance(turn, dict):
            raise DataError(f"{at}: expected a dict with from and value, found {type(turn).__name__}")
        role = field(turn, "from", at)
        if role not in SHAREGPT_ROLES:
            raise DataError(f"{at}: field 'from' expected one of {', '.join(SHAREGPT_ROLES)}, found {role!r}")
        messages.append({"role": SHAREGPT_ROLES[role], "content": field(turn, "value", at)})
    return messages


def encode_alpaca(row: dict, where: str, tokenizer) -> dict | None:
    """Alpaca: prompt = instruction (+ newline + input), response = output; with `system` or `history`
    (a list of [instruction, output] pairs) a conversation whose every output carries loss."""
    prompt = field(row, "instruction", where)
    extra = _optional(row, "input", where)
    prompt = f"{prompt}\n{extra}" if extra else prompt
    system = _optional(row, "system", where)
    history = _json_list(row, "history", where) if row.get("history") not in (None, "", []) else []
    if not system and not history:
        return encode_prompt_response(prompt, field(row, "output", where), tokenizer)
    messages = [{"role": "system", "content": system}] if system else []
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise DataError(f"{where}: field 'history[{i}]' expected [instruction, output] strings, found {pair!r}")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": field(row, "output", where)}]
    return encode_messages(messages, tokenizer, where)


def _render(tokenizer, messages: list[dict], where: str, generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except (TemplateError, ValueError, KeyError, TypeError, IndexError) as e:
        raise DataError(f"{where}: the chat template cannot render these messages ({e})") from None


def assistant_segments(messages: list[dict], tokenizer, where: str) -> list[tuple[str, bool]]:
    """Split the rendered conversation into (text, is_assistant) pieces that cover it exactly.

    An assistant turn i spans from the end of render(messages[:i], generation prompt) to the end of
    render(messages[:i+1]); both must be prefixes of the full rendering, which holds for templates that
    render a conversation turn by turn (ChatML, Llama, ...). Others are refused with the row named.
    """
    full = _render(tokenizer, messages, where)
    pieces: list[tuple[str, bool]] = []
    pos = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        head = _render(tokenizer, messages[:i], where, generation_prompt=True)  # up to the reply
        upto = _render(tokenizer, messages[: i + 1], where)  # through the reply and its end-of-turn marker
        if not (full.startswith(head) and full.startswith(upto)) or len(head) < pos or len(upto) <= len(head):
            raise DataError(f"{where}: cannot locate assistant turn messages[{i}] in the chat template's output; "
                            f"expected a template that renders a conversation turn by turn")
        pieces += [(full[pos:len(head)], False), (full[len(head):len(upto)], True)]
        pos = len(upto)
    pieces.append((full[pos:], False))
    return [(text, target) for text, target in pieces if text]


def encode_messages(messages: list[dict], tokenizer, where: str) -> dict | None:
    """Chat data: loss on assistant turns only. None (skipped as empty) when there is no non-empty assistant turn.

    Each piece is tokenized on its own, so a turn boundary is always a token boundary: the prompt side is
    tokenized exactly as it is at generation time (rendered up to the generation prompt), and the reply follows.
    """
    if not tokenizer.chat_template:
        raise DataError(f"{where}: the messages format needs a tokenizer with a chat template; this one has none")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        return None
    input_ids: list[int] = []
    labels: list[int] = []
    for text, target in assistant_segments(messages, tokenizer, where):
        ids = token_ids(tokenizer, text, special=False)
        input_ids += ids
        labels += ids if target else [IGNORE_INDEX] * len(ids)
    return {"input_ids": input_ids, "labels": labels}


def closing_special_ids(tokenizer) -> list[int]:
    """The special tokens the tokenizer appends after a text (BERT's [SEP]; none for most causal LMs)."""
    bare = token_ids(tokenizer, "a", special=False)
    full = token_ids(tokenizer, "a")
    for start in range(len(full) - len(bare) + 1):
        if full[start:start + len(bare)] == bare:
            return full[start + len(bare):]
    return []


def fit_length(example: dict, seq_len: int, tokenizer) -> dict:
    """Cut an example to `seq_len` tokens. Classification keeps the closing special tokens (e.g. [SEP])."""
    ids = example["input_ids"]
    if "labels" in example:
        return {"input_ids": ids[:seq_len], "labels": example["labels"][:seq_len]}
    closing = closing_special_ids(tokenizer)
    if not closing or ids[-len(closing):] != closing or len(closing) >= seq_len:
        closing = []
    return {"input_ids": ids[: seq_len - len(closing)] + closing, "label": example["label"]}


def has_target(example: dict) -> bool:
    """Whether a causal-lm example has a token to predict (labels shift by one: position 0 is never a target)."""
    return "label" in example or any(t != IGNORE_INDEX for t in example["labels"][1:])
