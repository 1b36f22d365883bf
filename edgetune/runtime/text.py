"""The bundle's tokenizer and chat template, loaded without transformers."""

from __future__ import annotations

from edgetune.bundle import Bundle
from edgetune.errors import BundleError
from edgetune.runtime.chat import ChatTemplate


def load_text(bundle: Bundle):
    """(tokenizers.Tokenizer, ChatTemplate) for ``bundle``."""
    from tokenizers import Tokenizer

    path = bundle.path("tokenizer")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for unreadable files
        raise BundleError(f"{path}: cannot read the tokenizer ({exc}); re-export the bundle.") from None
    info = bundle.manifest.tokenizer
    return tokenizer, ChatTemplate(info.chat_template, info.bos_token, info.eos_token)
