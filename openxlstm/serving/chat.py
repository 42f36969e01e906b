"""Chat messages -> one prompt: the model directory's chat template when it has one, else a plain one.

The plain template (models trained with ``openxlstm train`` have no chat format of their own) writes each
message as its role, a colon, a space and its content, followed by a blank line, and ends with the line that
asks for the answer::

    System: You are terse.

    User: Hello!

    Assistant:

(roles ``system``, ``developer``, ``user``, ``assistant`` are written System, Developer, User, Assistant). A
base model is likely to go on with a "User:" line after its answer, so clients send ``stop: ["\\nUser:"]``
when they want one answer.

A directory's template is the Jinja template of transformers' tokenizers (``chat_template.jinja``,
``chat_template.json`` or the ``chat_template`` field of ``tokenizer_config.json``), rendered with the
messages, ``add_generation_prompt=True`` and the ``bos_token`` / ``eos_token`` of ``tokenizer_config.json``
in a sandboxed environment; its special tokens (``<|im_start|>`` ...) are encoded as their ids.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

from ..errors import UserError

ROLES = ("system", "developer", "user", "assistant")


def plain_prompt(messages: list[dict]) -> str:
    """The plain template (see the module docstring): messages are {"role", "content"} dicts."""
    return "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages) + "Assistant:"


class ChatError(ValueError):
    """The template refused the messages (its ``raise_exception``) or failed on them."""


def _token_text(value) -> str:
    """A special token of tokenizer_config.json: a string, or transformers' {"content": ...} form."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


class ChatTemplate:
    """Renders chat messages into a prompt and encodes it. ``source``: "plain" or the file it came from."""

    def __init__(self, template: Optional[str] = None, bos_token: str = "", eos_token: str = "", source: str = "plain"):
        self.source = source if template is not None else "plain"
        self._template = None
        self._special = dict(bos_token=bos_token, eos_token=eos_token)
        if template is not None:
            try:
                from jinja2 import TemplateError
                from jinja2.sandbox import ImmutableSandboxedEnvironment
            except ImportError:
                raise UserError(f"the chat template of {source!r} needs jinja2: pip install jinja2") from None

            def raise_exception(message):
                raise ChatError(message)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
                x, indent=indent, ensure_ascii=ensure_ascii)
            env.globals["raise_exception"] = raise_exception
            try:
                self._template = env.from_string(template)
            except TemplateError as e:
                raise UserError(f"the chat template of {source!r} is not a valid Jinja template: {e}") from None

    @classmethod
    def from_directory(cls, directory) -> "ChatTemplate":
        """The template of a model directory (transformers' files), or the plain one if it has none."""
        d = Path(directory)
        config = {}
        if (d / "tokenizer_config.json").is_file():
            try:
                config = json.loads((d / "tokenizer_config.json").read_text())
            except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
                raise UserError(f"cannot read {str(d / 'tokenizer_config.json')!r}: {e}") from None
        special = dict(bos_token=_token_text(config.get("bos_token")), eos_token=_token_text(config.get("eos_token")))
        if (d / "chat_template.jinja").is_file():
            return cls.from_file(d / "chat_template.jinja", **special)
        template, source = config.get("chat_template"), d / "tokenizer_config.json"
        if (d / "chat_template.json").is_file():
            try:
                template = json.loads((d / "chat_template.json").read_text()).get("chat_template")
            except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
                raise UserError(f"cannot read {str(d / 'chat_template.json')!r}: {e}") from None
            source = d / "chat_template.json"
        if isinstance(template, list):  # named templates: the default one
            template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                            None)
        if template is None:
            return cls()
        if not isinstance(template, str):
            raise UserError(f"the chat template in {str(source)!r} is not a string")
        return cls(template, source=str(source), **special)

    @classmethod
    def from_file(cls, path, bos_token: str = "", eos_token: str = "") -> "ChatTemplate":
        """A Jinja template file (``--chat-template``)."""
        try:
            text = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read the chat template {str(path)!r}: {e}") from None
        return cls(text, bos_token, eos_token, source=str(path))

    def render(self, messages: list[dict]) -> str:
        """The prompt text of {"role", "content"} messages; ``ChatError`` when the template refuses them."""
        if self._template is None:
            return plain_prompt(messages)
        try:
            return self._template.render(messages=messages, add_generation_prompt=True, **self._special)
        except ChatError:
            raise
        except Exception as e:  # noqa: BLE001 - whatever a user's template raises is a refusal of these messages
            raise ChatError(f"{type(e).__name__}: {e}") from None

    def encoder(self, tokenizer) -> Callable[[str], list]:
        """text -> ids for rendered prompts: the tokenizer's own ``encode`` for the plain template; for a
        directory's template, the same vocabulary with its special tokens read as their ids and nothing
        added (the template writes the tokens it wants)."""
        inner = getattr(tokenizer, "tokenizer", None)
        if self._template is None or not hasattr(inner, "to_str"):
            return lambda text: [int(t) for t in tokenizer.encode(text)]
        import tokenizers

        special = tokenizers.Tokenizer.from_str(inner.to_str())
        if hasattr(special, "encode_special_tokens"):
            special.encode_special_tokens = False
        return lambda text: special.encode(text, add_special_tokens=False).ids


__all__ = ["ChatTemplate", "ChatError", "plain_prompt", "ROLES"]
