"""The model's chat template, rendered for a list of {"role", "content"} messages as transformers
renders it (its chat_template_utils): a sandboxed Jinja environment that trims blocks, with loop
controls, raise_exception, strftime_now, transformers' tojson, and the tokenizer's special tokens.
So a template written for transformers (Llama 3, Qwen, Phi, Gemma, Mistral, SmolLM2) gives the same
text here, and refuses the same messages (Gemma's system role, Mistral's roles that do not alternate).
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .model import RuntimeModelError

ROLES = ("system", "user", "assistant")
NAMED_TOKENS = "extra_special_tokens"  # tokenizer_config's dict of more named tokens (Gemma 3's boi_token, ...)


class ChatTemplateError(RuntimeModelError):
    """A chat template that is missing or broken, or that refuses the messages it is given."""


def templates_of(folder: Path, tokenizer_config: dict) -> dict[str, str]:
    """The folder's chat templates by name, found as transformers finds them: chat_template.jinja
    ("default") and additional_chat_templates/NAME.jinja when there are such files, else
    tokenizer_config.json's chat_template (one, or a list of named ones)."""
    files = {"default": folder / "chat_template.jinja",
             **{f.stem: f for f in sorted((folder / "additional_chat_templates").glob("*.jinja"))}}
    found = {name: f.read_text() for name, f in files.items() if f.is_file()}
    if found:
        return found
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):
        return {t["name"]: t["template"] for t in template if isinstance(t, dict) and "name" in t}
    return {"default": template} if isinstance(template, str) else {}


def template_of(folder: Path, tokenizer_config: dict, tools=None) -> str | None:
    """The template to render: "tool_use" when tools are given and the folder has one, else "default"."""
    templates = templates_of(folder, tokenizer_config)
    return templates.get("tool_use" if tools is not None and "tool_use" in templates else "default")


def special_tokens(tokenizer_config: dict) -> dict[str, str]:
    """The named tokens a template sees (bos_token, eos_token, pad_token, ... and model-specific ones):
    every `*_token` key of tokenizer_config.json that holds a token, as transformers passes them."""
    def content(v):
        return v.get("content") if isinstance(v, dict) else v

    named = {k: v for k, v in tokenizer_config.items() if k.endswith("_token")}
    if isinstance(tokenizer_config.get(NAMED_TOKENS), dict):
        named.update(tokenizer_config[NAMED_TOKENS])
    return {k: content(v) for k, v in named.items() if isinstance(content(v), str)}


def check_messages(messages: list[dict]) -> None:
    if not isinstance(messages, list) or not messages:
        raise ChatTemplateError("messages must be a non-empty list of {\"role\", \"content\"} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ChatTemplateError(f"message {i} must be {{\"role\": one of {', '.join(ROLES)}, \"content\": "
                                    f"text}}, got {str(m)[:80]}")


def render(folder: Path, tokenizer_config: dict, messages: list[dict], add_generation_prompt: bool = True,
           **template_kwargs) -> str:
    """The prompt text of `messages`. template_kwargs reach the template as variables (tools,
    enable_thinking, ...) and override the special tokens, as in transformers' apply_chat_template."""
    check_messages(messages)
    template = template_of(Path(folder), tokenizer_config, template_kwargs.get("tools"))
    if template is None:
        raise ChatTemplateError(f"{folder} has no chat template (tokenizer_config.json chat_template or "
                                "chat_template.jinja); send plain prompts instead")
    # tools and documents are always defined, None when not given, as transformers passes them
    variables = {"tools": None, "documents": None, **special_tokens(tokenizer_config), **template_kwargs}
    try:
        return compile_template(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                 **variables)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template of {folder} is not valid Jinja (line {e.lineno}: "
                                f"{e.message})") from None
    except jinja2.TemplateError as e:  # raise_exception, undefined values, the sandbox
        raise ChatTemplateError(f"the chat template refuses these messages: {e.message or type(e).__name__}") from None
    except Exception as e:  # the template is foreign code: whatever it trips on, say so plainly
        raise ChatTemplateError(f"the chat template fails on these messages: {e!r}") from None


class Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`, which transformers uses to mark the assistant's tokens
    for training: here it renders its body, as transformers does when it is not tracking them."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


@lru_cache(maxsize=8)
def compile_template(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(template)


def raise_exception(message):
    raise jinja2.TemplateError(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """transformers' tojson: plain json.dumps, not Jinja's HTML-escaping one."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def strftime_now(format):
    return datetime.now().strftime(format)
