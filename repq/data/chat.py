"""Chat conversations as the model sees them: its own template (GGUF ``tokenizer.chat_template``,
rendered with jinja2 the way transformers renders it), then llama.cpp's tokens with special tokens
parsed, so that ``<|im_start|>`` is one token."""

from __future__ import annotations

import json
from datetime import datetime

import numpy as np

from ..errors import InputFileError, UsageError
from .tokenizer import Tokenizer


def render_chat(template: str, messages: list[dict], *, bos_token: str = "", eos_token: str = "",
                add_generation_prompt: bool = False) -> str:
    """Render ``messages`` with a Hugging Face / GGUF chat template (jinja2, sandboxed).

    The environment is the one transformers uses (``trim_blocks``, ``lstrip_blocks``,
    ``raise_exception``, ``strftime_now``, a non-ASCII-escaping ``tojson``).

    Raises:
        UsageError: the template fails to render these messages.
    """
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise jinja2.exceptions.TemplateError(msg)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template).render(messages=messages, bos_token=bos_token, eos_token=eos_token,
                                                add_generation_prompt=add_generation_prompt)
    except jinja2.exceptions.TemplateError as e:
        raise UsageError(f"chat template failed: {e}") from e


def chat_tokens(tok: Tokenizer, messages: list[dict], *, add_generation_prompt: bool = False,
                where: str = "") -> np.ndarray:
    """Tokens of a conversation rendered with the model's template (special tokens parsed).

    BOS is added only when the vocabulary adds one and the template did not already write it.

    Raises:
        UsageError: the model has no chat template.
    """
    if not tok.chat_template:
        raise UsageError(f"{where or tok.path}: chat messages need a chat template, and {tok.path} has none "
                         "(no tokenizer.chat_template)", hint="use {\"text\": ...} records or plain text instead")
    bos_text = tok.token_text(tok.bos) if tok.bos >= 0 else ""
    try:
        text = render_chat(tok.chat_template, messages, bos_token=bos_text, eos_token=tok.token_text(tok.eos),
                           add_generation_prompt=add_generation_prompt)
    except UsageError as e:   # name the file whose template it is
        raise InputFileError(f"{tok.path}: {e}", hint="pass --template plain (repq eval) or fix "
                                                      "tokenizer.chat_template") from None
    add_special = not (bos_text and text.startswith(bos_text))
    return tok.tokenize(text, add_special=add_special, parse_special=True)
