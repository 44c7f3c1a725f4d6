"""Chat templates as transformers renders them, found where transformers looks for them."""

from __future__ import annotations

import json

import pytest

from dist_runtime.errors import EngineError, RequestError
from dist_runtime.server.chat_template import ChatTemplate
from dist_runtime.tokenizer import Tokenizer

LOOPS = ("{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
         "[{{ m.role }}] {{ m.content | tojson }}{% if loop.index == 2 %}{% break %}{% endif %}\n"
         "{% endfor %}{% generation %}{% if add_generation_prompt %}{{ eos_token }}{% endif %}{% endgeneration %}")
MESSAGES = [{"role": "system", "content": "s"}, {"role": "user", "content": "é"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "never"}]


def test_loop_controls_tojson_generation_and_special_tokens_render_as_transformers_does(checkpoints, tmp_path):
    from transformers import AutoTokenizer

    folder = tmp_path / "ckpt"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((checkpoints["llama"] / name).read_bytes())
    (folder / "chat_template.jinja").write_text(LOOPS)
    ours = Tokenizer(folder)
    expected = AutoTokenizer.from_pretrained(folder).apply_chat_template(MESSAGES, add_generation_prompt=True,
                                                                          tokenize=False)
    assert ChatTemplate(ours.chat_templates, ours.special_tokens).render(MESSAGES) == expected


def test_named_templates_and_an_override_file(checkpoints, tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes((checkpoints["llama"] / "tokenizer.json").read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "default", "template": "D{{ messages[0].content }}"},
        {"name": "tool_use", "template": "T{{ messages[0].content }}"}]}))
    tok = Tokenizer(folder)
    assert ChatTemplate(tok.chat_templates, {}).render([{"role": "user", "content": "x"}]) == "Dx"
    assert ChatTemplate(tok.chat_templates, {}, "tool_use").render([{"role": "user", "content": "x"}]) == "Tx"
    override = tmp_path / "mine.jinja"
    override.write_text("M{{ messages | length }}")
    assert ChatTemplate(tok.chat_templates, {}, str(override)).render([{"role": "user", "content": "x"}]) == "M1"
    with pytest.raises(EngineError, match="neither a template file nor one of the model's"):
        ChatTemplate(tok.chat_templates, {}, "missing")


def test_no_template_is_a_request_error_not_an_invented_format():
    with pytest.raises(RequestError, match="no chat template"):
        ChatTemplate({}, {}).render([{"role": "user", "content": "x"}])


def test_raise_exception_fails_the_request_with_the_templates_message():
    template = ChatTemplate({"default": "{{ raise_exception('only user turns, please') }}"}, {})
    with pytest.raises(RequestError, match="only user turns, please"):
        template.render([{"role": "user", "content": "x"}])
