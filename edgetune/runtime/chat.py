"""Chat templates (Jinja) rendered the way transformers renders them, without transformers.

transformers compiles templates in an ``ImmutableSandboxedEnvironment(trim_blocks=True,
lstrip_blocks=True)`` with the loop-controls extension, a ``tojson`` filter and the globals
``raise_exception`` and ``strftime_now``; the same here, so a bundle's template renders alike.
"""

from __future__ import annotations

import json
import re
from datetime import datetime

from edgetune.errors import DataError

# Used when a model has no chat template: a plain instruction/response layout.
FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}### Response:\n{{ message['content'] }}{{ eos_token or '' }}\n"
    "{% else %}### {{ message['role'] | capitalize }}:\n{{ message['content'] }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}### Response:\n{% endif %}"
)

# Roles every chat template handles (transformers' conversation format); "tool" only where the
# template itself names it, since a template without it renders a tool turn as free text.
DEFAULT_ROLES = ("system", "user", "assistant")
OPTIONAL_ROLES = ("tool",)


def _raise(message: str):
    raise DataError(f"the chat template refused the conversation: {message}")


class ChatTemplate:
    def __init__(self, template: str | None, bos_token: str | None = None, eos_token: str | None = None):
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent, ensure_ascii=ensure_ascii)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.source = template or FALLBACK_TEMPLATE
        try:
            self._template = env.from_string(self.source)
        except Exception as exc:  # jinja2.TemplateSyntaxError and friends
            raise DataError(f"the bundle's chat template does not compile ({exc}); re-export the bundle.") from None
        self.bos_token, self.eos_token = bos_token, eos_token
        named = [r for r in OPTIONAL_ROLES if re.search(rf"""['"]{r}['"]""", self.source)]
        self.roles: tuple[str, ...] = DEFAULT_ROLES + tuple(named)  # what a chat record's messages may use

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"the chat template failed on a conversation ({type(exc).__name__}: {exc}).") from None
