"""The tokenizer a GGUF file carries: vocabulary, merges, llama.cpp's pre-tokenizer name, special
token ids and the chat template, read from an HF folder (byte-level BPE tokenizers only)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from gguf import GGUFWriter, TokenType
from signround_runtime.chat import template_of

from ...errors import GGUFExportError

# The pre-tokenizer names llama.cpp knows, by the sha256 of the vocabulary (tokens by id, joined by
# newlines). Families that share a vocabulary share the pre-tokenizer.
KNOWN_VOCABS = {
    "d1f2ce856b324081b621d9e2e8dbd22879f462329f3fd4aa39fa758dddb2ce55": "smollm",  # SmolLM, SmolLM2
}
SPECIAL_TOKENS = ("bos", "eos", "unk", "pad")


@dataclass(frozen=True)
class Vocab:
    pre: str  # llama.cpp's pre-tokenizer name
    tokens: list[str]  # by id
    types: list[TokenType]
    merges: list[str]  # "a b"
    special_ids: dict[str, int]  # of SPECIAL_TOKENS, those the folder names
    add_bos: bool
    chat_template: str | list | None  # a list: several named templates


def vocab_tokens(tok: dict, vocab_size: int) -> tuple[list[str], list[TokenType]]:
    """Every token by id (ids past the tokenizer's up to vocab_size as unused pads) and its type."""
    model = tok.get("model") or {}
    if model.get("type") != "BPE":
        raise GGUFExportError(f"tokenizer.json has a {model.get('type')!r} model; the GGUF exporter writes "
                              "byte-level BPE (gpt2-style) tokenizers only")
    if is_sentencepiece_bpe(model):
        # llama.cpp reads these as its "llama" (SentencePiece) vocabulary, with scores; written as "gpt2"
        # they would load and tokenize wrongly, whatever pre-tokenizer name is given
        raise GGUFExportError("tokenizer.json is a SentencePiece-style BPE (byte fallback, \"\u2581\" word "
                              "markers: Llama 2, Mistral 7B, Gemma); the GGUF exporter writes byte-level BPE "
                              "(gpt2-style) tokenizers only, so it refuses this one rather than write wrong tokens")
    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    types = {i: TokenType.NORMAL for i in by_id}
    for added in tok.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
    size = max(vocab_size, max(by_id) + 1)
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(size)]
    return tokens, [types.get(i, TokenType.UNUSED) for i in range(size)]


def is_sentencepiece_bpe(model: dict) -> bool:
    """A BPE model in SentencePiece's manner: bytes as <0xNN> fallback tokens, words marked by "\u2581"."""
    vocab = model.get("vocab") or {}
    return bool(model.get("byte_fallback")) or "<0x0A>" in vocab or any(t.startswith("\u2581") for t in vocab)


def vocab_id(value, tokens: list[str]) -> int | None:
    """The id of a special token given by its content (tokenizer_config: a string or an AddedToken
    dict) or by its id; None when the vocabulary does not have it."""
    if isinstance(value, dict):  # tokenizer_config's AddedToken form
        value = value.get("content")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value in tokens:
        return tokens.index(value)
    return None


def token_content(value) -> str | None:
    """A special token of tokenizer_config.json (a string or an AddedToken dict) as its text."""
    return value.get("content") if isinstance(value, dict) else value


def adds_bos(tok: dict, tcfg: dict) -> bool:
    """Whether the tokenizer starts every encoded text with BOS, decided as llama.cpp's converter does:
    tokenizer_config.json's add_bos_token when it is a bool, else tokenizer.json's post-processor (a
    TemplateProcessing whose single-text template opens with the BOS token, or a RobertaProcessing).
    With no tokenizer_config.json, the token opening the template is the BOS."""
    if isinstance(tcfg.get("add_bos_token"), bool):
        return tcfg["add_bos_token"]
    bos_like = {token_content(tcfg.get("bos_token")), token_content(tcfg.get("cls_token"))} - {None}
    post = tok.get("post_processor") or {}
    add = False
    for processor in post.get("processors", [post]):  # a Sequence lists several; the last that decides wins
        if processor.get("type") == "RobertaProcessing":
            add = True
        elif processor.get("type") == "TemplateProcessing" and len(single := processor.get("single", [])) > 1:
            if (first := single[0].get("SpecialToken", {}).get("id")) is not None:
                add = first in bos_like or not tcfg
    return add


def tokenizer_pre(tokens: list[str]) -> str | None:
    """llama.cpp's pre-tokenizer name for a vocabulary it knows, else None."""
    return KNOWN_VOCABS.get(hashlib.sha256("\n".join(tokens).encode()).hexdigest())


def read_vocab(folder: Path, hf: dict, pre: str | None = None) -> Vocab:
    """The tokenizer of an HF folder (tokenizer.json, tokenizer_config.json, chat_template.jinja);
    pre: llama.cpp's pre-tokenizer name, found from the vocabulary when None."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise GGUFExportError(f"{folder} has no tokenizer.json; the GGUF file must carry the tokenizer "
                              "(copy the source model's tokenizer files into the checkpoint)")
    tok = json.loads(path.read_text())
    tcfg_path = folder / "tokenizer_config.json"
    tcfg = json.loads(tcfg_path.read_text()) if tcfg_path.is_file() else {}
    tokens, types = vocab_tokens(tok, hf["vocab_size"])
    pre = pre or tokenizer_pre(tokens)
    if pre is None:
        raise GGUFExportError("this vocabulary is not one whose llama.cpp pre-tokenizer is known here; pass "
                              "tokenizer_pre_name with the name llama.cpp uses for the model family "
                              "(for example llama-bpe, qwen2, smollm, gpt-2)", param="tokenizer_pre_name")
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"].get("merges", [])]
    if not merges:
        raise GGUFExportError(f"{path} has no BPE merges; llama.cpp cannot load a BPE tokenizer without them")
    special = {key: vocab_id(tcfg.get(f"{key}_token"), tokens) for key in SPECIAL_TOKENS}
    special = {key: i if i is not None else vocab_id(hf.get(f"{key}_token_id"), tokens) for key, i in special.items()}
    template = tcfg.get("chat_template")
    if not isinstance(template, list):  # several named templates: gguf-py writes each under its name
        template = template_of(folder, tcfg)
    return Vocab(pre, tokens, types, merges, {k: i for k, i in special.items() if i is not None},
                 adds_bos(tok, tcfg), template)


def add_vocab(w: GGUFWriter, vocab: Vocab) -> None:
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    w.add_token_merges(vocab.merges)
    for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id),
                     ("unk", w.add_unk_token_id), ("pad", w.add_pad_token_id)):
        if key in vocab.special_ids:
            add(vocab.special_ids[key])
    w.add_add_bos_token(vocab.add_bos)
    if vocab.chat_template:
        w.add_chat_template(vocab.chat_template)
