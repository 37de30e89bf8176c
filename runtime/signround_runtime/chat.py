"""The model's chat template, rendered for a list of {"role", "content"} messages.

Templates are Jinja; jinja2 renders them when it is installed. Without it, ChatML templates (the
<|im_start|>role ... <|im_end|> family: SmolLM2, Qwen2) are rendered by the small function below,
which follows the same layout; any other template asks for jinja2.
"""

from __future__ import annotations

from pathlib import Path

ROLES = ("system", "user", "assistant")


def template_of(folder: Path, tokenizer_config: dict) -> str | None:
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # several named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    return template


def check_messages(messages: list[dict]) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {\"role\", \"content\"} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} must be {{\"role\": one of {', '.join(ROLES)}, \"content\": text}}, "
                             f"got {str(m)[:80]}")


def render(folder: Path, tokenizer_config: dict, messages: list[dict]) -> str:
    check_messages(messages)
    template = template_of(folder, tokenizer_config)
    if template is None:
        raise ValueError(f"{folder} has no chat template (tokenizer_config.json chat_template or "
                         "chat_template.jinja); send plain prompts instead")

    def token(key):
        v = tokenizer_config.get(key)
        return v.get("content", "") if isinstance(v, dict) else (v or "")

    try:
        import jinja2
    except ImportError:
        jinja2 = None
    if jinja2 is not None:
        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(template).render(messages=messages, add_generation_prompt=True,
                                                bos_token=token("bos_token"), eos_token=token("eos_token"))
    if "<|im_start|>" not in template:
        raise ValueError("this model's chat template needs jinja2 to render: pip install jinja2")
    return chatml(template, messages)


def chatml(template: str, messages: list[dict]) -> str:
    """ChatML without Jinja; a default system message is kept when the template writes one."""
    out = []
    default_system = _default_system(template)
    if messages[0]["role"] != "system" and default_system:
        out.append(f"<|im_start|>system\n{default_system}<|im_end|>\n")
    for m in messages:
        out.append(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n")
    return "".join(out) + "<|im_start|>assistant\n"


def _default_system(template: str) -> str | None:
    start = template.find("<|im_start|>system\n")
    if start < 0:
        return None
    end = template.find("<|im_end|>", start)
    text = template[start + len("<|im_start|>system\n"): end]
    return text if "{" not in text and "'" not in text else None
