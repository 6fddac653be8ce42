"""A Hugging Face model directory's tokenizer, as the model defines it: `dist-lm prepare
--tokenizer MODEL_DIR` makes data a continued run of that model (model.init_from) trains on.

The tokenizer.json is kept byte for byte (its hash is how a run checks that its data is the
model's), and nothing is added to it: no token of ours, no id past the model's vocabulary. A
document is the model's beginning-of-sequence token where its tokenizer puts one (read from its
post-processor, as `tokenizer(text)` would add it), the text, and the model's end-of-sequence
token (tokenizer_config.json's eos_token, else config.json's eos_token_id). A chat ('messages')
is rendered by the model's own chat template, in jinja2's sandbox: the template is data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dist_lm.data.readers import CHAT_ROLES, DataError

TOKENIZER_FILE = "tokenizer.json"


@dataclass(frozen=True)
class ModelTokenizer:
    directory: Path
    tokenizer_json: str
    """tokenizer.json's text, unchanged."""
    eos_token: str
    """Ends every document (meta.json's eot_id is its id)."""
    bos_token: str | None
    """Begins every document, where the model's tokenizer puts one (Llama, Mistral; Qwen3 none)."""
    chat_template: str | None

    def meta(self, ids: Callable[[str], int]) -> dict:
        """What meta.json records of the model's tokens (``ids``: token -> id)."""
        return {
            "eot_id": ids(self.eos_token),
            "bos_id": ids(self.bos_token) if self.bos_token else None,
            "special_tokens": [t for t in (self.bos_token, self.eos_token) if t],
            "eos_token": self.eos_token,
            "bos_token": self.bos_token,
            "chat_template": self.chat_template,
            "tokenizer_from": str(self.directory),
        }


def _json_file(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is not readable JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def _token_text(value: object) -> str | None:
    """tokenizer_config.json writes a token as its text or as {"content": text, ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def read_model_tokenizer(directory: Path) -> ModelTokenizer:
    """The model's tokenizer and its document tokens; one line for what is missing."""
    from tokenizers import Tokenizer

    path = directory / TOKENIZER_FILE
    if not path.is_file():
        raise DataError(
            f"{directory} has no {TOKENIZER_FILE} (dist-lm reads Hugging Face fast tokenizers); make one with "
            f"transformers: AutoTokenizer.from_pretrained('{directory}').save_pretrained('{directory}')"
        )
    try:
        text = path.read_bytes().decode("utf-8")
        tokenizer = Tokenizer.from_str(text)
    except Exception as e:  # tokenizers raises plain Exceptions for unreadable files
        raise DataError(f"{path} is not a readable tokenizer.json ({e})") from None
    config = _json_file(directory / "tokenizer_config.json")
    eos = _token_text(config.get("eos_token"))
    if eos is None:  # the model's own config names it by id
        for name in ("generation_config.json", "config.json"):
            eos_id = _json_file(directory / name).get("eos_token_id")
            eos_id = eos_id[0] if isinstance(eos_id, list) and eos_id else eos_id
            if isinstance(eos_id, int) and (eos := tokenizer.id_to_token(eos_id)):
                break
    if eos is None or tokenizer.token_to_id(eos) is None:
        raise DataError(
            f"{directory}: no end-of-sequence token in its tokenizer_config.json (eos_token) or config.json "
            "(eos_token_id) that its tokenizer knows; documents need one to end"
        )
    bare, marked = tokenizer.encode("x", add_special_tokens=False).ids, tokenizer.encode("x").ids
    before = marked[: len(marked) - len(bare)] if marked[-len(bare) :] == bare else []
    bos = tokenizer.id_to_token(before[0]) if len(before) == 1 else None
    template = config.get("chat_template")
    return ModelTokenizer(directory, text, eos, bos, template if isinstance(template, str) else None)


def chat_renderer(model: ModelTokenizer) -> Callable[[list, str], str]:
    """Render a 'messages' list with the model's chat template (jinja2's immutable sandbox, as
    transformers renders it). The beginning-of-sequence token is given as empty: prepare puts
    the id before each document itself, once."""
    if model.chat_template is None:

        def refuse(messages: list, where: str) -> str:
            raise DataError(
                f"{where}: a 'messages' chat, but {model.directory} has no chat template (tokenizer_config.json "
                "chat_template); give the text in a text field"
            )

        return refuse
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message: str) -> None:
        raise DataError(f"the chat template of {model.directory} refused a chat: {message}")

    env.globals["raise_exception"] = raise_exception
    template = env.from_string(model.chat_template)

    def render(messages: list, where: str) -> str:
        if not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
            raise DataError(
                f"{where}: each entry of 'messages' needs a role ({', '.join(CHAT_ROLES)}) and a string content"
            )
        try:
            return template.render(
                messages=messages, bos_token="", eos_token=model.eos_token, add_generation_prompt=False
            )
        except TemplateError as e:
            raise DataError(f"{where}: the chat template of {model.directory} failed on it ({e})") from None

    return render
