"""Wrapper over the `tokenizers` library: encode/decode, the chat template when the folder has one, stop ids."""

from __future__ import annotations

import json
import os

from dspark_jax.errors import UsageError


class Tokenizer:
    """A `tokenizer.json` plus the optional chat template of `tokenizer_config.json`."""

    def __init__(self, folder: str):
        from tokenizers import Tokenizer as HFTokenizer

        self.folder = folder
        self._tok = HFTokenizer.from_file(os.path.join(folder, "tokenizer.json"))
        self.chat_template = None
        cfg_path = os.path.join(folder, "tokenizer_config.json")
        if os.path.isfile(cfg_path):
            with open(cfg_path) as f:
                self.chat_template = json.load(f).get("chat_template")

    @classmethod
    def maybe_load(cls, folder: str) -> "Tokenizer | None":
        return cls(folder) if os.path.isfile(os.path.join(folder, "tokenizer.json")) else None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode_prompt(self, text: str) -> list[int]:
        """A single user turn through the chat template (generation prompt on, thinking off), else plain text."""
        if not self.chat_template:
            return self.encode(text)
        try:
            import jinja2
        except ImportError:  # transformers brings jinja2; without it we cannot render HF templates
            raise UsageError("the tokenizer has a chat template but jinja2 is not installed; pip install jinja2")
        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
        rendered = env.from_string(self.chat_template).render(
            messages=[{"role": "user", "content": text}], add_generation_prompt=True, enable_thinking=False
        )
        return self.encode(rendered)


def stop_token_ids(folder: str, config: dict) -> tuple[int, ...]:
    """EOS ids from generation_config.json (preferred) or config.json; () when neither names one."""
    path = os.path.join(folder, "generation_config.json")
    eos = None
    if os.path.isfile(path):
        with open(path) as f:
            eos = json.load(f).get("eos_token_id")
    if eos is None:
        eos = config.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))
