"""``edgetune generate``: render a prompt, decode with the KV-cache graph, return the answer text."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgetune.bundle import Bundle
from edgetune.errors import EdgetuneError
from edgetune.runtime.adapter_source import disabled, latest_adapter
from edgetune.runtime.data import prompt_ids
from edgetune.runtime.generate import Generator
from edgetune.runtime.text import load_text


class Answerer:
    """Keeps the generation session open for several prompts (demo, held-out checks)."""

    def __init__(self, bundle: Bundle, *, threads: int = 0, state_dir: Path | None = None, checkpoint: str = "latest",
                 compute: str = "exact"):
        self.bundle = bundle
        self.manifest = bundle.manifest
        if self.manifest.generation is None:
            raise EdgetuneError(f"bundle {str(bundle.folder)!r} has no generation graph; re-export it with this edgetune.")
        self.tokenizer, self.template = load_text(bundle)
        self.generator = Generator(bundle, threads=threads, compute=compute)
        self.trained = latest_adapter(bundle, state_dir, checkpoint=checkpoint)
        self.off = disabled(bundle, self.trained.tensors)

    def __call__(self, prompt: str, *, system: str | None = None, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, use_adapter: bool = True, raw: bool = False) -> str:
        if max_new_tokens <= 0:
            raise EdgetuneError(f"`--max-new-tokens` must be positive, got {max_new_tokens}.")
        if temperature < 0 or not 0 < top_p <= 1:
            raise EdgetuneError(f"need --temperature >= 0 and 0 < --top-p <= 1, got {temperature} and {top_p}.")
        if raw:
            ids = np.array(self.tokenizer.encode(prompt, add_special_tokens=False).ids, dtype=np.int64)
        else:
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            ids = prompt_ids(messages, self.tokenizer, self.template)
        adapter = self.trained.tensors if use_adapter else self.off
        new = self.generator.generate(ids, adapter, max_new_tokens=max_new_tokens, temperature=temperature,
                                      top_p=top_p, seed=seed, stop_ids=tuple(self.manifest.tokenizer.stop_token_ids))
        return self.tokenizer.decode([int(i) for i in new], skip_special_tokens=True).strip()


def answer(bundle: Bundle, prompt: str, *, use_adapter: bool = True, threads: int = 0, state_dir: Path | None = None,
           checkpoint: str = "latest", compute: str = "exact", **kwargs) -> tuple[str, str]:
    answerer = Answerer(bundle, threads=threads, state_dir=state_dir, checkpoint=checkpoint, compute=compute)
    origin = answerer.trained.origin if use_adapter else "off (base model)"
    return answerer(prompt, use_adapter=use_adapter, **kwargs), origin
