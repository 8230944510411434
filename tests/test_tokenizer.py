"""Chat templates are untrusted input: they render in a Jinja sandbox (sandbox escapes and render failures are one-line
UsageErrors naming the folder, and nothing runs), and real-world templates (Qwen3, Gemma-3, DeepSeek-V3.1 style)
give the same token ids as transformers' `apply_chat_template`."""

import json
import os
import pathlib
import shutil

import jinja2
import pytest

from dspark_jax.errors import UsageError
from dspark_jax.tokenizer import Tokenizer

EMBEDDED = pathlib.Path(__file__).resolve().parents[1] / "dspark_jax" / "assets" / "tiny_code" / "target"

pytestmark = pytest.mark.skipif(not (EMBEDDED / "tokenizer.json").is_file(), reason="embedded target not built")


def write_tokenizer(folder, template, added=(), **special):
    """`folder` with the embedded target's tokenizer.json plus `added` as special added tokens (so templates' control
    tokens are single ids on both sides), and a tokenizer_config.json holding `template` and the `special` tokens."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = json.loads((EMBEDDED / "tokenizer.json").read_text())
    next_id = max([len(tok["model"]["vocab"])] + [t["id"] + 1 for t in tok["added_tokens"]])
    for i, content in enumerate(added):
        tok["added_tokens"].append(
            {
                "id": next_id + i,
                "content": content,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
        )
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return str(folder)


# --- the sandbox ----------------------------------------------------------------------------------------------------

# Each payload tries to create the file at {path}; all of them work under a plain jinja2.Environment.
PAYLOADS = {
    "cycler": "{{ cycler.__init__.__globals__.os.system('touch {path}') }}",
    "lipsum": "{{ lipsum.__globals__['os'].system('touch {path}') }}",
    "joiner": "{{ joiner.__init__.__globals__.os.system('touch {path}') }}",
    "namespace": "{{ namespace.__init__.__globals__.os.system('touch {path}') }}",
    "str_mro_subclasses": (
        "{% for c in ''.__class__.__mro__[1].__subclasses__() %}{% if c.__name__ == '_wrap_close' %}"
        "{{ c.__init__.__globals__['system']('touch {path}') }}{% endif %}{% endfor %}"
    ),
}
QWEN_LIKE_TAIL = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"


def _payload_template(name, path):
    return PAYLOADS[name].replace("{path}", str(path)) + QWEN_LIKE_TAIL


@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_payload_is_live_outside_the_sandbox(tmp_path, name):
    """The control: without the sandbox each payload does create its file (the old renderer's behaviour)."""
    marker = tmp_path / "pwned"
    jinja2.Environment().from_string(_payload_template(name, marker)).render(messages=[])
    assert marker.exists()


@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_payload_is_refused(tmp_path, name):
    marker = tmp_path / "pwned"
    folder = write_tokenizer(tmp_path / "tok", _payload_template(name, marker))
    tok = Tokenizer(folder)
    with pytest.raises(UsageError) as e:
        tok.encode_prompt("hi")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"chat template of {folder} tried an unsafe operation (")
    assert msg.endswith("refusing to run it")
    assert not marker.exists()


def test_attr_filter_escape_fails_cleanly(tmp_path):
    # `|attr` goes through the sandbox too; it ends as an undefined value, so the error is a render failure.
    marker = tmp_path / "pwned"
    template = "{{ (cycler|attr('__init__')|attr('__globals__'))['os'].system('touch " + str(marker) + "') }}"
    folder = write_tokenizer(tmp_path / "tok", template)
    with pytest.raises(UsageError, match=f"chat template of {folder} "):
        Tokenizer(folder).encode_prompt("hi")
    assert not marker.exists()


def test_namespace_refuses_private_attributes(tmp_path):
    folder = write_tokenizer(tmp_path / "tok", "{% set ns = namespace() %}{% set ns.__class__ = 1 %}{{ ns }}")
    with pytest.raises(UsageError, match="tried an unsafe operation .*'__class__'"):
        Tokenizer(folder).encode_prompt("hi")
    folder = write_tokenizer(tmp_path / "tok2", "{% set ns = namespace(_x=1) %}{{ ns._x }}")
    with pytest.raises(UsageError, match="tried an unsafe operation"):
        Tokenizer(folder).encode_prompt("hi")


def test_syntax_error_is_one_line(tmp_path):
    folder = write_tokenizer(tmp_path / "tok", "{% for m in messages %}{{ m.content }}\n{% if %}")
    tok = Tokenizer(folder)  # loading does not compile: --prompt-ids must still work with a broken template
    assert tok.encode("hi") == Tokenizer(str(EMBEDDED)).encode("hi")
    with pytest.raises(UsageError) as e:
        tok.encode_prompt("hi")
    assert "\n" not in str(e.value)
    assert str(e.value).startswith(f"chat template of {folder} is not valid Jinja (line 2:")


def test_render_error_is_one_line(tmp_path):
    folder = write_tokenizer(tmp_path / "tok", "{{ messages[0].content + 1 }}")
    with pytest.raises(UsageError, match=f"^chat template of {folder} failed while rendering \\(TypeError: "):
        Tokenizer(folder).encode_prompt("hi")


def test_raise_exception_is_a_usage_error(tmp_path):
    folder = write_tokenizer(tmp_path / "tok", "{{ raise_exception('Only user and assistant roles are supported!') }}")
    with pytest.raises(UsageError) as e:
        Tokenizer(folder).encode_prompt("hi")
    assert str(e.value) == (
        f"chat template of {folder} rejected the messages: Only user and assistant roles are supported!"
    )


def test_template_compiled_once(tmp_path, monkeypatch):
    folder = write_tokenizer(tmp_path / "tok", QWEN_LIKE_TAIL)
    tok = Tokenizer(folder)
    tok.encode_prompt("a")
    compiled = tok._compiled()
    tok.encode_prompt("b")
    assert tok._compiled() is compiled


def test_cli_refuses_the_payload(tmp_path, capsys):
    import dspark_jax.generate as cli

    marker = tmp_path / "pwned"
    folder = write_tokenizer(tmp_path / "target", _payload_template("cycler", marker))
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        os.symlink(EMBEDDED / name, os.path.join(folder, name))
    code = cli.main(["--target", folder, "--no-draft", "--prompt", "hi", "--max-new-tokens", "2"])
    out, err = capsys.readouterr()
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"error: chat template of {folder} tried an unsafe operation")
    assert "Traceback" not in err and out == ""
    assert not marker.exists()


# --- parity with transformers ---------------------------------------------------------------------------------------

# Reproductions of the publicly known structure of the hub templates (written here: no network in tests).
QWEN3_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with \
function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\
\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and \
not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1]\
.lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + \
'\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""
QWEN3_TOKENS = (
    "<|im_start|>",
    "<|im_end|>",
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
)

GEMMA3_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""
GEMMA3_TOKENS = ("<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>")

# DeepSeek-V3.1 style: one line on the hub; `thinking` picks `<think>` or `</think>` after the assistant tag.
DEEPSEEK_TEMPLATE = "".join(
    [
        "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}",
        "{% if not thinking is defined %}{% set thinking = false %}{% endif %}",
        "{% set ns = namespace(is_first=false, is_tool=false, system_prompt='', is_first_sp=true, ",
        "is_last_user=false) %}",
        "{%- for message in messages %}{%- if message['role'] == 'system' %}{%- if ns.is_first_sp %}",
        "{% set ns.system_prompt = ns.system_prompt + message['content'] %}{% set ns.is_first_sp = false %}",
        "{%- else %}{% set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'] %}{%- endif %}",
        "{%- endif %}{%- endfor %}{{ bos_token }}{{ ns.system_prompt }}",
        "{%- for message in messages %}",
        "{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{%- set ns.is_first = false -%}",
        "{%- set ns.is_last_user = true -%}{{'<｜User｜>' + message['content']}}{%- endif %}",
        "{%- if message['role'] == 'assistant' and message['tool_calls'] is defined and ",
        "message['tool_calls'] is not none %}",
        "{%- if ns.is_last_user %}{{'<｜Assistant｜></think>'}}{%- endif %}",
        "{%- set ns.is_last_user = false -%}{%- set ns.is_first = false %}{%- set ns.is_tool = false -%}",
        "{%- for tool in message['tool_calls'] %}{%- if not ns.is_first %}{%- if message['content'] is none %}",
        "{{'<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['function']['name'] + '<｜tool▁sep｜>' + ",
        "tool['function']['arguments'] + '<｜tool▁call▁end｜>'}}{%- else %}",
        "{{message['content'] + '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['function']['name'] + ",
        "'<｜tool▁sep｜>' + tool['function']['arguments'] + '<｜tool▁call▁end｜>'}}{%- endif %}",
        "{%- set ns.is_first = true -%}{%- else %}{{'<｜tool▁call▁begin｜>' + tool['function']['name'] + ",
        "'<｜tool▁sep｜>' + tool['function']['arguments'] + '<｜tool▁call▁end｜>'}}{%- endif %}{%- endfor %}",
        "{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}",
        "{%- if message['role'] == 'assistant' and (message['tool_calls'] is not defined or ",
        "message['tool_calls'] is none) %}{%- if ns.is_last_user %}{{'<｜Assistant｜>'}}",
        "{%- if message['prefix'] is defined and message['prefix'] and thinking %}{{'<think>'}}",
        "{%- else %}{{'</think>'}}{%- endif %}{%- endif %}{%- set ns.is_last_user = false -%}",
        "{%- if ns.is_tool %}{{message['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}",
        "{%- else %}{%- set content = message['content'] -%}{%- if '</think>' in content %}",
        "{%- set content = content.split('</think>', 1)[1] -%}{%- endif %}",
        "{{content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}",
        "{%- if message['role'] == 'tool' %}{%- set ns.is_last_user = false -%}{%- set ns.is_tool = true -%}",
        "{{'<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}",
        "{%- endfor -%}",
        "{%- if add_generation_prompt and ns.is_last_user and not ns.is_tool %}{{'<｜Assistant｜>'}}",
        "{%- if not thinking %}{{'</think>'}}{%- else %}{{'<think>'}}{%- endif %}{% endif %}",
    ]
)
DEEPSEEK_TOKENS = (
    "<｜begin▁of▁sentence｜>",
    "<｜end▁of▁sentence｜>",
    "<｜User｜>",
    "<｜Assistant｜>",
    "<think>",
    "</think>",
    "<｜tool▁calls▁begin｜>",
    "<｜tool▁calls▁end｜>",
    "<｜tool▁call▁begin｜>",
    "<｜tool▁call▁end｜>",
    "<｜tool▁sep｜>",
    "<｜tool▁output▁begin｜>",
    "<｜tool▁output▁end｜>",
)


def _added_token(content):  # how hub configs serialize a special token
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False}


FAMILIES = {
    "qwen3": (QWEN3_TEMPLATE, QWEN3_TOKENS, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}),
    "gemma3": (GEMMA3_TEMPLATE, GEMMA3_TOKENS, {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}),
    "deepseek": (
        DEEPSEEK_TEMPLATE,
        DEEPSEEK_TOKENS,
        {"bos_token": _added_token("<｜begin▁of▁sentence｜>"), "eos_token": _added_token("<｜end▁of▁sentence｜>")},
    ),
}

SYSTEM = {"role": "system", "content": "You are a careful assistant. Answer in <b>one</b> line & briefly."}
USER = {"role": "user", "content": "What does `def fibonacci(n):` return? Ça va, 中文?"}
CONVERSATIONS = {
    "user": [USER],
    "system_user": [SYSTEM, USER],
    "multi_turn": [
        SYSTEM,
        USER,
        {"role": "assistant", "content": "<think>\nThe n-th number.\n</think>\n\nThe n-th Fibonacci number."},
        {"role": "user", "content": "And for n = 0?"},
    ],
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city; returns <json> & units",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
QWEN3_TOOL_CHAT = [
    SYSTEM,
    {"role": "user", "content": "Weather in Zürich?"},
    {
        "role": "assistant",
        "content": None,  # dropped, as transformers drops None-valued keys
        "reasoning_content": "Call the tool.",
        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}],
    },
    {"role": "tool", "content": '{"temp": 21, "unit": "°C"}'},
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("templates")
    return {
        name: write_tokenizer(root / name, template, tokens, **special)
        for name, (template, tokens, special) in FAMILIES.items()
    }


def _hf_ids(out):
    """transformers 5 returns a BatchEncoding by default, 4.x a list of ids."""
    if isinstance(out, list):
        return out
    return list(out["input_ids"])


def _check_parity(folder, messages, **kwargs):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    ours = Tokenizer(folder)
    text = ours.render_chat_template(messages, **kwargs)
    add_generation_prompt = kwargs.pop("add_generation_prompt", True)
    want_text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs)
    assert text == want_text
    want = _hf_ids(
        hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt, **kwargs)
    )
    got = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)
    assert got == want
    return got


@pytest.mark.parametrize("enable_thinking", [None, True, False])
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_qwen3_parity(folders, conversation, enable_thinking):
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    ids = _check_parity(folders["qwen3"], CONVERSATIONS[conversation], **kwargs)
    tok = Tokenizer(folders["qwen3"])
    prompt = [tok.token_id("<|im_start|>"), *tok.encode("assistant\n")]
    empty_think = tok.encode("<think>\n\n</think>\n\n")  # thinking off: an empty think block is pre-filled
    suffix = prompt + empty_think if enable_thinking is False else prompt
    assert ids[-len(suffix) :] == suffix
    # Reasoning of turns before the last user query is dropped, so `<think>` only comes from the empty block.
    assert (tok.token_id("<think>") in ids) == (enable_thinking is False)


def test_qwen3_encode_prompt_is_one_user_turn_without_thinking(folders):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(folders["qwen3"])
    messages = [{"role": "user", "content": "hi"}]
    want = _hf_ids(hf.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=False))
    assert Tokenizer(folders["qwen3"]).encode_prompt("hi") == want


@pytest.mark.parametrize("enable_thinking", [True, False])
def test_qwen3_tools_and_reasoning_parity(folders, enable_thinking):
    _check_parity(folders["qwen3"], QWEN3_TOOL_CHAT, tools=TOOLS, enable_thinking=enable_thinking)
    # The last assistant turn (reasoning kept, generation prompt off) renders `<think>` from reasoning_content.
    chat = [USER, {"role": "assistant", "content": "Fib(n).", "reasoning_content": "Easy."}]
    _check_parity(folders["qwen3"], chat, add_generation_prompt=False, enable_thinking=enable_thinking)


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_gemma3_parity(folders, conversation):
    messages = [dict(m) for m in CONVERSATIONS[conversation]]
    messages[-1]["content"] = [{"type": "text", "text": messages[-1]["content"] + "  "}]  # content blocks, trimmed
    ids = _check_parity(folders["gemma3"], messages)
    assert ids[0] == Tokenizer(folders["gemma3"]).token_id("<bos>")


def test_gemma3_bad_roles_raise_like_transformers(folders):
    transformers = pytest.importorskip("transformers")
    messages = [USER, USER]
    with pytest.raises(jinja2.exceptions.TemplateError, match="roles must alternate"):
        transformers.AutoTokenizer.from_pretrained(folders["gemma3"]).apply_chat_template(messages)
    with pytest.raises(UsageError) as e:
        Tokenizer(folders["gemma3"]).apply_chat_template(messages)
    assert str(e.value) == (
        f"chat template of {folders['gemma3']} rejected the messages: "
        "Conversation roles must alternate user/assistant/user/assistant/..."
    )


@pytest.mark.parametrize("thinking", [None, True, False])
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_deepseek_parity(folders, conversation, thinking):
    kwargs = {} if thinking is None else {"thinking": thinking}
    ids = _check_parity(folders["deepseek"], CONVERSATIONS[conversation], **kwargs)
    tok = Tokenizer(folders["deepseek"])
    assert ids[0] == tok.token_id("<｜begin▁of▁sentence｜>")  # bos_token given as a serialized AddedToken
    assert ids[-1] == tok.token_id("<think>" if thinking else "</think>")


def test_helpers_parity(tmp_path):
    """tojson (no HTML escaping, options), loop controls, dict, strftime_now and the {% generation %} tag render as
    in transformers."""
    template = (
        "{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
        "{% if loop.index > 3 %}{% break %}{% endif %}"
        "{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}"
        "{% else %}{{ m | tojson }}|{{ m | tojson(indent=2, sort_keys=true) }}{% endif %}{% endfor %}"
        "{{ dict(a=1, b='<&>') | tojson(separators=(',', ':')) }}{{ dict.fromkeys(['x'], 0) | tojson }}"
        "{{ strftime_now('%Y') }}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    folder = write_tokenizer(tmp_path / "tok", template, ("<|im_start|>", "<s>"), bos_token="<s>")
    messages = [SYSTEM, USER, {"role": "assistant", "content": "ok"}, USER, USER]
    _check_parity(folder, messages)
    text = Tokenizer(folder).render_chat_template(messages)
    assert '"<b>one</b>' not in text and "中文" in text and '{"a":1,"b":"<&>"}' in text


def test_chat_template_jinja_file_wins(tmp_path):
    folder = write_tokenizer(tmp_path / "tok", "from config")
    (tmp_path / "tok" / "chat_template.jinja").write_text("from file {{ messages[0].content }}\n")
    assert Tokenizer(folder).render_chat_template([USER]) == "from file " + USER["content"]
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    assert hf.apply_chat_template([USER], tokenize=False, add_generation_prompt=True) == "from file " + USER["content"]


def test_no_template_encodes_plain_text(tmp_path):
    folder = str(tmp_path / "tok")
    shutil.copytree(EMBEDDED, folder, ignore=lambda d, names: [n for n in names if n != "tokenizer.json"])
    tok = Tokenizer(folder)
    assert tok.chat_template is None and tok.encode_prompt("hi") == tok.encode("hi")
    with pytest.raises(UsageError, match="has no chat template"):
        tok.apply_chat_template([USER])


def test_special_tokens_map_json_parity(tmp_path):
    """Configs without `added_tokens_decoder` take their special tokens from special_tokens_map.json (legacy)."""
    folder = write_tokenizer(tmp_path / "tok", "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}", ("<s>",))
    special = {"bos_token": _added_token("<s>"), "eos_token": "<|endoftext|>"}
    (tmp_path / "tok" / "special_tokens_map.json").write_text(json.dumps(special))
    ids = _check_parity(folder, [USER])
    tok = Tokenizer(folder)
    assert ids[0] == tok.token_id("<s>") and ids[-1] == tok.token_id("<|endoftext|>")
