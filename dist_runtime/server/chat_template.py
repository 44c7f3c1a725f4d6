"""Chat messages to a prompt: the checkpoint's own Jinja chat template, rendered as
transformers renders it, or a plain default when the checkpoint has none."""

from __future__ import annotations

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from dist_runtime.errors import RequestError

DEFAULT_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class ChatTemplate:
    def __init__(self, config: dict) -> None:
        """`config`: the checkpoint's tokenizer_config.json."""
        source = config.get("chat_template") or DEFAULT_TEMPLATE
        # transformers renders in a sandbox, trims blocks, allows {% break %} and {% continue %},
        # and offers raise_exception()
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = _raise
        self.template = env.from_string(source)
        self.special = {k: v for k, v in config.items() if k in ("bos_token", "eos_token") and isinstance(v, str)}

    def render(self, messages: list[dict]) -> str:
        """The prompt text; a template that refuses these messages (raise_exception, or any
        other failure on them) fails this request alone, with the template's message."""
        try:
            return self.template.render(messages=messages, add_generation_prompt=True, **self.special)
        except jinja2.TemplateError as e:
            raise RequestError(f"messages: the chat template refused them: {e.message or e}", "messages") from e
        except Exception as e:  # noqa: BLE001 - a template's own bug meets these messages only
            raise RequestError(f"messages: the chat template failed on them: {e}", "messages") from e


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)
