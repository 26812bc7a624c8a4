import json

import pytest

from server.chat_template import ChatTemplate
from server.errors import ModelLoadError

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]


def test_default_template_is_the_documented_one():
    assert ChatTemplate()(MESSAGES) == "<|system|>\nBe brief.\n<|user|>\nHi!\n<|assistant|>\n"


def test_a_model_directory_template_is_used_with_its_special_tokens(tmp_path):
    template = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}"
                "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": template, "bos_token": "<s>", "eos_token": {"content": "</s>"}}))
    assert ChatTemplate.from_model_dir(tmp_path)(MESSAGES) == "<s>[system] Be brief.</s>[user] Hi!</s>[assistant]"


def test_templates_run_sandboxed_and_can_refuse_a_conversation():
    template = ChatTemplate("{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}ok")
    with pytest.raises(Exception, match="user first"):
        template(MESSAGES)
    with pytest.raises(Exception):
        ChatTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}")(MESSAGES)


def test_a_broken_template_is_a_load_error():
    with pytest.raises(ModelLoadError, match="does not compile"):
        ChatTemplate("{% for %}")
