"""Chat templates: the runtime renders and tokenizes every family's template as transformers'
apply_chat_template does (text and token ids, one BOS), and a template's refusal is a clear error
in the API, the CLI (printed) and the server (HTTP 400).

The templates below are written for these tests in the style of each family's real one, to use the
same features: Llama 3.x (bos_token, strftime_now, the system message cut off the list), Qwen3 (tools
through tojson, an enable_thinking flag, a namespace, loop controls), Gemma (raise_exception on a
system role, <start_of_turn> turns, a model-specific named token), Mistral (the alternation check),
Phi-3 (<|user|> turns laid out over lines, so trim_blocks/lstrip_blocks decide the whitespace) and
ChatML as SmolLM2 has it (a default system message, read from chat_template.jinja)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field

import pytest
from signround_runtime import Model
from signround_runtime.chat import ChatTemplateError, render
from signround_runtime.cli import main as run_main
from signround_runtime.manifest import write_manifest
from tokenizers import AddedToken, processors

from conftest import make_tokenizer, rtn_checkpoint
from signround_export.checkpoint.read import read_checkpoint
from signround_export.export.onnx.build import export_onnx

transformers = pytest.importorskip("transformers")

LLAMA3 = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = strftime_now("%d %b %Y") %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\nToday Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'
        + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

QWEN3 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions.\\n\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- if message.role == 'user' %}
        {%- set ns.last_query_index = messages|length - 1 - loop.index0 %}
        {%- break %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.role == 'system' %}
        {%- continue %}
    {%- endif %}
    {%- set content = message.content %}
    {%- if message.role == 'assistant' and '</think>' in content %}
        {%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}
        {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- set content = '<think>\\n' + reasoning + '\\n</think>\\n\\n' + content %}
        {%- endif %}
    {%- endif %}
    {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

GEMMA = """{{ bos_token }}
{% if messages[0]['role'] == 'system' %}
{{ raise_exception('System role not supported') }}
{% endif %}
{% for message in messages %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
{{ raise_exception('Conversation roles must alternate user/model/user/model/...') }}
    {% endif %}
    {% if message['role'] == 'assistant' %}
        {% set role = 'model' %}
    {% else %}
        {% set role = message['role'] %}
    {% endif %}
{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}
{% endfor %}
{% if add_generation_prompt %}
{{ '<start_of_turn>model\\n' }}
{% endif %}
{% if image_token is defined and image_token in messages[-1]['content'] %}{{ boi_token }}{% endif %}
"""

MISTRAL = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.last and system_message is defined %}
            {{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}
        {%- else %}
            {{- '[INST] ' + message['content'] + '[/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token }}
    {%- endif %}
{%- endfor %}
"""

PHI3 = """{% for message in messages %}
  {% if message['role'] == 'system' %}
{{ '<|system|>\\n' + message['content'] + '<|end|>' }}
  {% elif message['role'] == 'user' %}
{{ '<|user|>\\n' + message['content'] + '<|end|>' }}
  {% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\\n' + message['content'] + '<|end|>' }}
  {% endif %}
{% endfor %}
{% if add_generation_prompt %}
{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"""

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
          "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

TALK = [{"role": "user", "content": " What does a  fox jump over? "},
        {"role": "assistant", "content": "The lazy dog, über alles."},
        {"role": "user", "content": "And quantization <b>maps</b>?"}]
SYSTEM = [{"role": "system", "content": "Be brief; answer in one line.\n"}]
TOOLS = [{"type": "function", "function": {
    "name": "temperature", "description": "Temperature in °C of a city <b>now</b> & here",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


@dataclass
class Family:
    template: str
    specials: list[str]  # added special tokens, the first being BOS when bos is set
    tokens: dict  # named tokens of tokenizer_config.json
    bos: bool = False  # the tokenizer's post-processor adds BOS, as Llama 3's and Gemma's do
    jinja_file: bool = False  # the template in chat_template.jinja (tokenizer_config's is then a decoy)
    chats: list[tuple[list[dict], dict]] = field(default_factory=list)  # messages, template variables


FAMILIES = {
    "llama3": Family(LLAMA3, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                     {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, bos=True,
                     chats=[(SYSTEM + TALK, {}), (TALK, {}), (TALK, {"date_string": "26 Jul 2024"})]),
    "qwen3": Family(QWEN3, ["<|im_start|>", "<|im_end|>"], {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
                    chats=[(SYSTEM + TALK, {"tools": TOOLS}), (TALK, {"enable_thinking": False}),
                           (TALK[:1] + [{"role": "assistant", "content": "<think>\nfox\n</think>\n\nA dog."}]
                            + TALK[2:], {"enable_thinking": True})]),
    "gemma": Family(GEMMA, ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                            "<image_soft_token>"],
                    {"bos_token": "<bos>", "eos_token": "<eos>", "boi_token": "<start_of_image>",
                     "image_token": {"content": "<image_soft_token>", "special": True, "__type": "AddedToken"}},
                    bos=True,
                    chats=[(TALK, {}), (TALK[:2] + [{"role": "user", "content": "See <image_soft_token>"}], {})]),
    "mistral": Family(MISTRAL, ["<s>", "</s>", "[INST]", "[/INST]"], {"bos_token": "<s>", "eos_token": "</s>"},
                      bos=True, chats=[(SYSTEM + TALK, {}), (TALK, {})]),
    "phi3": Family(PHI3, ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"], {"eos_token": "<|endoftext|>"},
                   chats=[(SYSTEM + TALK, {}), (TALK, {})]),
    "chatml": Family(CHATML, ["<|im_start|>", "<|im_end|>"], {"eos_token": "<|im_end|>"}, jinja_file=True,
                     chats=[(TALK, {}), (SYSTEM + TALK, {})]),
}


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    """One tiny exported model (vocabulary 320); each family swaps in its own tokenizer."""
    base = tmp_path_factory.mktemp("chat")
    ckpt = read_checkpoint(rtn_checkpoint(tiny_model, base / "ckpt", bits=4, group_size=32))
    export_onnx(ckpt, base / "onnx", accuracy_level=0)
    return base / "onnx"


def family_folder(exported, tmp_path, name: str):
    """The exported model with a family's tokenizer: a 300-token BPE plus its special tokens (ids stay
    inside the model's 320), its named tokens, its template, and a post-processor adding BOS if it has one."""
    family = FAMILIES[name]
    folder = tmp_path / name
    shutil.copytree(exported, folder)
    tok = make_tokenizer(300)
    tok.add_special_tokens([AddedToken(t, special=True) for t in family.specials])
    if family.bos:
        bos = family.specials[0]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **family.tokens, "chat_template": family.template}
    if family.jinja_file:
        (folder / "chat_template.jinja").write_text(family.template)
        config["chat_template"] = "{{ 'a decoy: transformers reads chat_template.jinja first' }}"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    write_manifest(folder)  # the folder as made here
    return folder


def theirs(folder, messages, tokenize=False, **variables):
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=tokenize, return_dict=False,
                                   **variables)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_each_family_renders_and_tokenizes_as_transformers(exported, tmp_path, name):
    folder = family_folder(exported, tmp_path, name)
    model = Model(folder, threads=1)
    for messages, variables in FAMILIES[name].chats:
        text = model.chat_prompt(messages, **variables)
        assert text == theirs(folder, messages, **variables)
        ids = model.chat_ids(messages, **variables)
        assert ids == theirs(folder, messages, tokenize=True, **variables)
        assert ids == model.tokenizer.encode(text, add_special_tokens=False).ids
    if FAMILIES[name].bos:  # the template writes BOS and the tokenizer would add one too: one BOS only
        bos = model.tokenizer.token_to_id(FAMILIES[name].specials[0])
        assert ids[0] == bos and ids.count(bos) == 1
        assert model.tokenizer.encode(text).ids[:2] == [bos, bos]  # what encoding with special tokens would do


def test_features_transformers_gives_templates(exported, tmp_path):
    """The details that set transformers' rendering apart from plain Jinja, each seen in the text."""
    from datetime import datetime

    model = Model(family_folder(exported, tmp_path, "llama3"), threads=1)
    assert f"Today Date: {datetime.now():%d %b %Y}\n" in model.chat_prompt(TALK)  # strftime_now
    assert model.chat_prompt(TALK).startswith("<|begin_of_text|><|start_header_id|>system")  # bos_token
    qwen = Model(family_folder(exported, tmp_path, "qwen3"), threads=1)
    # tojson as json.dumps: no HTML escapes, non-ASCII kept
    assert '"description": "Temperature in °C of a city <b>now</b> & here"' in qwen.chat_prompt(TALK, tools=TOOLS)
    assert qwen.chat_prompt(TALK, enable_thinking=False).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert qwen.chat_prompt(TALK).endswith("<|im_start|>assistant\n")
    phi = Model(family_folder(exported, tmp_path, "phi3"), threads=1)
    # trim_blocks and lstrip_blocks: no indentation, and a line break only after each {{ }} line
    assert phi.chat_prompt(TALK[:1]) == f"<|user|>\n{TALK[0]['content']}<|end|>\n<|assistant|>\n"
    assert phi.chat_prompt(TALK[:1], add_generation_prompt=False).endswith("<|end|>\n<|endoftext|>")
    smol = Model(family_folder(exported, tmp_path, "chatml"), threads=1)
    assert smol.chat_prompt(TALK[:1]).startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_tools_none_and_the_generation_tag_as_transformers(exported, tmp_path):
    """tools and documents are None when not given (not undefined), and `{% generation %}` (transformers'
    marker of the assistant's tokens) renders its body."""
    template = ("{{ tools is none }} {{ documents is none }}{% for m in messages %}{% if m.role == 'assistant' %}"
                "{% generation %}[{{ m.content }}]{% endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}")
    folder = family_folder(exported, tmp_path, "chatml")
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    text = render(tmp_path, {"chat_template": template}, TALK)
    assert text == tok.apply_chat_template(TALK, chat_template=template, tokenize=False)
    assert text.startswith("True True") and f"[{TALK[1]['content']}]" in text


@pytest.mark.parametrize("layout", ["files", "config list"])
def test_a_tool_use_template_is_chosen_when_tools_are_given(exported, tmp_path, layout):
    """Several named templates, as transformers saves them (chat_template.jinja and
    additional_chat_templates/) or as older folders list them in tokenizer_config.json."""
    folder = family_folder(exported, tmp_path, "qwen3")
    tool_use = "{{ bos_token }}TOOLS {{ tools | tojson }}{% for m in messages %}|{{ m.content }}{% endfor %}"
    config = json.loads((folder / "tokenizer_config.json").read_text())
    if layout == "files":
        (folder / "chat_template.jinja").write_text(QWEN3)
        (folder / "additional_chat_templates").mkdir()
        (folder / "additional_chat_templates" / "tool_use.jinja").write_text(tool_use)
        config.pop("chat_template")
    else:
        config["chat_template"] = [{"name": "default", "template": QWEN3}, {"name": "tool_use", "template": tool_use}]
    config["bos_token"] = "<|im_start|>"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    write_manifest(folder)
    model = Model(folder, threads=1)
    with_tools = model.chat_prompt(TALK, tools=TOOLS)
    assert with_tools.startswith("<|im_start|>TOOLS [{") and with_tools == theirs(folder, TALK, tools=TOOLS)
    assert model.chat_ids(TALK, tools=TOOLS) == theirs(folder, TALK, tokenize=True, tools=TOOLS)
    assert model.chat_prompt(TALK) == theirs(folder, TALK) and model.chat_prompt(TALK).startswith("<|im_start|>user")


@pytest.mark.parametrize("name, messages, message", [
    ("gemma", SYSTEM + TALK, "System role not supported"),
    ("gemma", TALK[:1] * 2, "Conversation roles must alternate user/model"),
    ("mistral", SYSTEM + TALK[:1] * 2, "After the optional system message, conversation roles must alternate"),
])
def test_a_template_refusing_the_messages_says_why_as_transformers_does(exported, tmp_path, name, messages, message):
    folder = family_folder(exported, tmp_path, name)
    with pytest.raises(ChatTemplateError, match=f"refuses these messages: {message}"):
        Model(folder, threads=1).chat_ids(messages)
    with pytest.raises(Exception, match=message):
        theirs(folder, messages)


@pytest.mark.parametrize("template, message", [
    ("{{ messages[0].content.nothing.here }}", "refuses these messages: 'str object' has no attribute 'nothing'"),
    ("{% for m in messages %}{{ m.content }}", "not valid Jinja \\(line 1: Unexpected end of template"),
    ("{{ messages.append(messages[0]) }}", "refuses these messages: access to attribute 'append'"),  # the sandbox
    ("{{ messages[0].content + 1 }}", "fails on these messages: TypeError"),
])
def test_a_broken_template_is_a_clear_error(tmp_path, template, message):
    with pytest.raises(ChatTemplateError, match=message):
        render(tmp_path, {"chat_template": template}, TALK[:1])


def test_messages_are_checked_and_a_folder_without_a_template_is_named(tmp_path):
    with pytest.raises(ChatTemplateError, match="message 1 must be"):
        render(tmp_path, {"chat_template": CHATML}, TALK[:1] + [{"role": "robot", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="has no chat template"):
        render(tmp_path, {}, TALK[:1])


def test_the_cli_chats_through_the_template_and_prints_its_refusal(exported, tmp_path, monkeypatch, capfd):
    folder = family_folder(exported, tmp_path, "gemma")
    lines = iter(["What does a fox jump over?"])

    def typed(prompt=""):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", typed)
    assert run_main(["chat", str(folder), "--max-new-tokens", "3", "--threads", "1"]) == 0
    want = theirs(folder, [{"role": "user", "content": "What does a fox jump over?"}], tokenize=True)
    assert f"[{len(want)} prompt tokens" in capfd.readouterr().err
    assert run_main([str(folder), "hi", "--system", "Be brief.", "--threads", "1"]) == 2
    assert "signround-run: error: the chat template refuses these messages: System role not supported" in \
        capfd.readouterr().err


def test_the_server_answers_a_refused_message_with_400(exported, tmp_path):
    pytest.importorskip("starlette")
    from signround_runtime.server import Server
    from starlette.testclient import TestClient

    folder = family_folder(exported, tmp_path, "gemma")
    with TestClient(Server(Model(folder, threads=1), model_name="tiny").app()) as client:
        refused = client.post("/v1/chat/completions", json={"messages": SYSTEM + TALK, "max_tokens": 2})
        assert refused.status_code == 400
        error = refused.json()["error"]
        assert error["message"] == "the chat template refuses these messages: System role not supported"
        assert (error["param"], error["code"]) == ("messages", "invalid_messages")
        answered = client.post("/v1/chat/completions", json={"messages": TALK, "max_tokens": 2, "temperature": 0})
        assert answered.status_code == 200
        assert answered.json()["usage"]["prompt_tokens"] == len(theirs(folder, TALK, tokenize=True))


def test_the_server_passes_chat_template_kwargs_to_the_template(exported, tmp_path):
    pytest.importorskip("starlette")
    from signround_runtime.server import Server
    from starlette.testclient import TestClient

    folder = family_folder(exported, tmp_path, "qwen3")
    with TestClient(Server(Model(folder, threads=1), model_name="tiny").app()) as client:
        def prompt_tokens(**body):
            r = client.post("/v1/chat/completions", json={"messages": TALK, "max_tokens": 1, **body})
            assert r.status_code == 200, r.text
            return r.json()["usage"]["prompt_tokens"]

        thinking_off = prompt_tokens(chat_template_kwargs={"enable_thinking": False})
        assert thinking_off == len(theirs(folder, TALK, tokenize=True, enable_thinking=False))
        assert prompt_tokens() == len(theirs(folder, TALK, tokenize=True)) < thinking_off
        taken = client.post("/v1/chat/completions", json={"messages": TALK, "chat_template_kwargs": {"messages": []}})
        assert taken.status_code == 400 and "cannot set messages" in taken.json()["error"]["message"]
