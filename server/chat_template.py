"""Chat messages -> prompt text, through the model's Jinja chat template.

The template comes from ``tokenizer_config.json`` (``chat_template``) when the model directory
has one; otherwise this documented default is used:

    <|system|>\\n{content}\\n<|user|>\\n{content}\\n ... <|assistant|>\\n

Templates run in Jinja's sandbox, with ``messages``, ``add_generation_prompt=True``,
``bos_token`` and ``eos_token`` defined, as Hugging Face's ``apply_chat_template`` does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import ModelLoadError

DEFAULT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class ChatTemplate:
    def __init__(self, template: str | None = None, bos_token: str = "", eos_token: str = ""):
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        self.source = template or DEFAULT_TEMPLATE
        try:
            self._template = env.from_string(self.source)
        except TemplateError as exc:
            raise ModelLoadError(f"chat_template does not compile: {exc}") from None
        self._bos, self._eos = bos_token, eos_token

    def __call__(self, messages: list[dict[str, Any]]) -> str:
        return str(self._template.render(messages=messages, add_generation_prompt=True,
                                         bos_token=self._bos, eos_token=self._eos))

    @classmethod
    def from_model_dir(cls, root: Path | None) -> ChatTemplate:
        """The directory's template (``tokenizer_config.json``), else the default."""
        path = root / "tokenizer_config.json" if root is not None else None
        if path is None or not path.is_file():
            return cls()
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{path}: cannot be read as JSON: {exc}") from None
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: take "default"
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        return cls(template if isinstance(template, str) else None, _token(config.get("bos_token")),
                   _token(config.get("eos_token")))


def _token(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return value if isinstance(value, str) else ""


def _raise(message: str) -> None:
    from jinja2 import TemplateError

    raise TemplateError(message)
