"""Chat messages to a prompt, rendered as transformers' `apply_chat_template` renders them: the
checkpoint's own Jinja template (or `--chat-template`), in a sandbox with blocks trimmed, loop
controls, `raise_exception`, `tojson`, `strftime_now` and the special tokens. No template, no
chat: the chat routes then answer 400 rather than invent a format."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import jinja2
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from dist_runtime.errors import EngineError, RequestError


class _Generation(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; a
    prompt renders its body as is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols", _Generation])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env


class ChatTemplate:
    def __init__(self, templates: dict[str, str], special_tokens: dict[str, str], choice: str | None = None) -> None:
        """`templates`: name -> source, as the tokenizer found them; `choice`: a template file, or
        the name of one of `templates` (default: "default", or the only one)."""
        self.special_tokens = special_tokens
        source = _pick(templates, choice)
        try:
            self.template = None if source is None else _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise EngineError(f"the chat template does not parse: {e}") from e

    def render(self, messages: list[dict]) -> str:
        """The prompt text; a template that refuses these messages (raise_exception, or any
        other failure on them) fails this request alone, with the template's message."""
        if self.template is None:
            raise RequestError("messages: this model has no chat template; start the server with "
                               "--chat-template FILE, or send a prompt to /v1/completions", "messages")
        try:
            return self.template.render(messages=messages, tools=None, documents=None, add_generation_prompt=True,
                                        **self.special_tokens)
        except jinja2.TemplateError as e:
            raise RequestError(f"messages: the chat template refused them: {e.message or e}", "messages") from e
        except Exception as e:  # noqa: BLE001 - a template's own bug meets these messages only
            raise RequestError(f"messages: the chat template failed on them: {e}", "messages") from e


def _pick(templates: dict[str, str], choice: str | None) -> str | None:
    if choice is not None:
        if choice in templates:
            return templates[choice]
        try:
            return Path(choice).read_text(encoding="utf-8")
        except (OSError, ValueError) as e:
            raise EngineError(f"--chat-template {choice}: neither a template file nor one of the model's "
                              f"({', '.join(templates) or 'it has none'}): {e}") from e
    if "default" in templates or len(templates) != 1:
        return templates.get("default")
    return next(iter(templates.values()))


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)
