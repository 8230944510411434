"""Wrapper over the `tokenizers` library: encode/decode, the chat template when the folder has one, stop ids.

A checkpoint folder or hub repo is untrusted input, and its chat template is a program. It is rendered in Jinja's
`ImmutableSandboxedEnvironment` with the helpers that hub templates expect from transformers (`raise_exception`,
`strftime_now`, a `tojson` that does not HTML-escape, loop controls, the `{% generation %}` tag), so a template
renders to the same text as `transformers` renders it; anything it tries outside the sandbox, and any error while
rendering, is a one-line `UsageError` naming the folder, and nothing of the template runs.
"""

from __future__ import annotations

import functools
import json
import os
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from dspark_jax.errors import UsageError

CHAT_TEMPLATE_FILE = "chat_template.jinja"  # saved next to tokenizer_config.json by newer transformers; it wins
# The named special tokens transformers hands every template as variables (`{{ bos_token }}` ...).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Names a message's reasoning arrives under; templates read `reasoning_content` (Qwen3) or `thinking` (gpt-oss).
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class Tokenizer:
    """A `tokenizer.json`, the named special tokens and the optional chat template of `tokenizer_config.json`
    (or `chat_template.jinja`)."""

    def __init__(self, folder: str):
        from tokenizers import Tokenizer as HFTokenizer

        self.folder = folder
        path = os.path.join(folder, "tokenizer.json")
        try:
            self._tok = HFTokenizer.from_file(path)
        except Exception as e:  # the Rust side raises plain Exception for a corrupt or foreign file
            raise UsageError(f"{path} is not a tokenizer the `tokenizers` library can read ({_one_line(e)})") from None
        cfg = _read_json_object(os.path.join(folder, "tokenizer_config.json"))
        legacy_map = {}
        if "added_tokens_decoder" not in cfg:  # transformers reads special_tokens_map.json only for such configs
            legacy_map = _read_json_object(os.path.join(folder, "special_tokens_map.json"))
        self.special_tokens = _special_tokens({**cfg, **legacy_map})
        self.chat_template = _chat_template_source(folder, cfg)
        self._template = None  # the compiled template, built at first use (a broken one must not block --prompt-ids)

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
        return self.apply_chat_template([{"role": "user", "content": text}], enable_thinking=False)

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
        **kwargs: Any,
    ) -> list[int]:
        """Token ids of `messages` rendered by the chat template, as `transformers`' `apply_chat_template(...,
        tokenize=True)` gives them. `enable_thinking=None` leaves the variable undefined (the template's default);
        other keyword arguments (`tools`, `documents`, `thinking`, ...) become template variables."""
        return self.encode(
            self.render_chat_template(messages, add_generation_prompt, enable_thinking=enable_thinking, **kwargs)
        )

    def render_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        **kwargs: Any,
    ) -> str:
        """The text the chat template renders for `messages` (see `apply_chat_template`)."""
        if not self.chat_template:
            raise UsageError(
                f"{self.folder} has no chat template (tokenizer_config.json chat_template); use encode(text)"
            )
        chat = _normalize_messages(messages)
        if enable_thinking is not None:
            kwargs["enable_thinking"] = enable_thinking
        for name, value in (("tools", tools), ("documents", documents)):
            if value is not None and not (isinstance(value, list) and all(isinstance(v, dict) for v in value)):
                raise UsageError(
                    f"{name} must be a list of dicts (JSON schemas / documents), got {type(value).__name__}"
                )
        # Special tokens first so that a caller's keyword wins, as in transformers.
        variables = _plain({**self.special_tokens, **kwargs})
        template = self._compiled()
        try:
            return template.render(
                messages=chat,
                tools=_plain(tools),
                documents=_plain(documents),
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except jinja2.exceptions.SecurityError as e:
            raise UsageError(
                f"chat template of {self.folder} tried an unsafe operation ({_one_line(e)}); refusing to run it"
            ) from None
        except _TemplateRaised as e:
            raise UsageError(f"chat template of {self.folder} rejected the messages: {_one_line(e)}") from None
        except Exception as e:  # the template is untrusted input: any failure of it is bad input, not our bug
            raise UsageError(
                f"chat template of {self.folder} failed while rendering ({type(e).__name__}: {_one_line(e)})"
            ) from None

    def _compiled(self):
        """The template compiled once per Tokenizer in the sandbox."""
        if self._template is None:
            try:
                self._template = _sandbox().from_string(self.chat_template)
            except jinja2.exceptions.TemplateSyntaxError as e:
                raise UsageError(
                    f"chat template of {self.folder} is not valid Jinja (line {e.lineno}: {_one_line(e.message)}); "
                    "fix it or pass token ids"
                ) from None
            except Exception as e:  # compilation of untrusted text; report it the same way
                raise UsageError(
                    f"chat template of {self.folder} does not compile ({type(e).__name__}: {_one_line(e)})"
                ) from None
        return self._template


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


# --- reading the folder -------------------------------------------------------------------------------------------


def _read_json_object(path: str) -> dict:
    """The JSON object in `path`, {} when the file is absent."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{path} is not readable JSON ({_one_line(e)})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _special_tokens(cfg: dict) -> dict[str, str]:
    """The named special tokens as strings; a serialized AddedToken ({"content": ...}) counts by its content."""
    out = {}
    for name in SPECIAL_TOKEN_NAMES:
        value = cfg.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            out[name] = value
    return out


def _chat_template_source(folder: str, cfg: dict) -> str | None:
    """`chat_template.jinja` if present, else tokenizer_config.json's `chat_template` (a string, or a list of named
    templates of which the one named "default" is used)."""
    path = os.path.join(folder, CHAT_TEMPLATE_FILE)
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"{path} is not readable UTF-8 text ({_one_line(e)})") from None
    template = cfg.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise UsageError(
                f"{folder}/tokenizer_config.json: chat_template lists {sorted(map(str, named))} but no 'default' one"
            )
        template = named["default"]
    if template is not None and not isinstance(template, str):
        raise UsageError(
            f"{folder}/tokenizer_config.json: chat_template must be a string or a list of "
            f"{{name, template}}, got {type(template).__name__}"
        )
    return template


# --- the sandbox ----------------------------------------------------------------------------------------------------


class _TemplateRaised(jinja2.exceptions.TemplateError):
    """What `raise_exception(message)` in a template raises (a TemplateError, as in transformers)."""


def _raise_exception(message):
    raise _TemplateRaised(str(message))


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson HTML-escapes <, >, & and '; transformers renders JSON plain, with these options.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _DictBuilder:
    """`dict(...)` / `dict.fromkeys(...)` for templates, without handing them the `dict` type itself."""

    def __call__(self, *args, **kwargs) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, keys, value=None) -> dict:
        return dict.fromkeys(keys, value)


def _refuse_private_name(name) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with '_'")


class _Namespace(jinja2.utils.Namespace):
    """`namespace(...)` whose attributes may not start with `_`, so no dunder can be stored and read back."""

    def __init__(*args, **kwargs):  # self travels in args, like Namespace's, so namespace(self=...) is an attribute
        attrs = dict(*args[1:], **kwargs)
        for name in attrs:
            _refuse_private_name(name)
        jinja2.utils.Namespace.__init__(args[0], attrs)

    def __setitem__(self, name, value):
        _refuse_private_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering keeps the body."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


@functools.lru_cache(maxsize=1)
def _sandbox() -> ImmutableSandboxedEnvironment:
    """One sandboxed environment with what transformers gives templates: trim_blocks + lstrip_blocks, loop controls,
    the `{% generation %}` tag, `tojson`, `raise_exception`, `strftime_now`, and `dict` / `namespace` that cannot
    reach Python internals."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _DictBuilder()
    env.globals["namespace"] = _Namespace
    return env


# --- what the template sees -----------------------------------------------------------------------------------------


def _normalize_messages(messages) -> list[dict]:
    """Plain copies of the messages: None-valued keys dropped (templates handle a missing key, not a None), the
    reasoning copied under every name templates read."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise UsageError(f"messages must be a non-empty list of {{role, content}} dicts, got {messages!r:.80}")
    chat = []
    for message in messages:
        if not isinstance(message, dict):
            raise UsageError(f"each message must be a dict with 'role' and 'content', got {message!r:.80}")
        message = _plain({k: v for k, v in message.items() if v is not None})
        reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        chat.append(message)
    return chat


def _plain(value):
    """`value` rebuilt from plain JSON types, so the template reaches no object whose methods the sandbox does not
    know to be dangerous; anything else becomes a placeholder naming its type."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    item = getattr(value, "item", None)
    if type(value).__module__ == "numpy" and callable(item) and getattr(value, "shape", None) == ():
        return _plain(item())  # numpy scalars: np.bool_(False) must stay falsy
    return f"<{type(value).__name__}>"


def _one_line(e) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 240 else text[:237] + "..."
