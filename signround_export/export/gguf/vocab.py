"""The tokenizer a GGUF file carries: vocabulary, llama.cpp's tokenizer model and pre-tokenizer name,
merges or scores, special token ids and flags, and the chat template, read from an HF folder.

Two kinds of tokenizer.json BPE are written: byte-level BPE as llama.cpp's "gpt2" vocabulary (with merges
and a pre-tokenizer name, pretokenizer.py), and SentencePiece-style BPE as its "llama" vocabulary (with
scores and token types, spm.py). Anything llama.cpp would tokenize differently is refused by name."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from gguf import GGUFWriter, TokenType
from signround_runtime.chat import template_of

from ...errors import GGUFExportError
from ...model.folder import read_json
from .pretokenizer import tokenizer_pre
from .spm import (check_added_raw, check_merges, is_byte_level, is_sentencepiece_bpe, merge_scores, space_prefix,
                  spm_types)
from .strip import strips

SPECIAL_TOKENS = ("bos", "eos", "unk", "pad")


@dataclass(frozen=True)
class Vocab:
    model: str  # llama.cpp's tokenizer model: "gpt2" (byte-level BPE) or "llama" (SentencePiece-style)
    pre: str  # llama.cpp's pre-tokenizer name ("default" for "llama", which has none)
    tokens: list[str]  # by id
    types: list[TokenType]
    merges: list[str]  # "a b"; "gpt2" only
    special_ids: dict[str, int]  # of SPECIAL_TOKENS, those the folder names
    add_bos: bool
    chat_template: str | list | None  # a list: several named templates
    add_eos: bool = False
    scores: list[float] | None = None  # "llama" only
    add_space_prefix: bool | None = None  # "llama" only
    strips: bool | None = None  # special tokens take the spaces after them (strip.py); None: none would


def vocab_tokens(tok: dict, vocab_size: int) -> tuple[list[str], list[TokenType]]:
    """Every token by id (ids past the tokenizer's up to vocab_size as unused pads) and its type."""
    by_id: dict[int, str] = {i: t for t, i in tok["model"]["vocab"].items()}
    types = {i: TokenType.NORMAL for i in by_id}
    for added in tok.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
    size = max(vocab_size, max(by_id) + 1)
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(size)]
    return tokens, [types.get(i, TokenType.UNUSED) for i in range(size)]


def check_added_tokens(tok: dict) -> None:
    """llama.cpp matches added tokens as they are written: one that takes the spaces before it (lstrip) or
    only whole words would tokenize the text beside it differently."""
    for added in tok.get("added_tokens", []):
        if taken := [flag for flag in ("lstrip", "single_word") if added.get(flag)]:
            raise GGUFExportError(f"tokenizer.json's added token {added['content']!r} has {', '.join(taken)}, which "
                                  "llama.cpp does not apply to it: the text beside it would tokenize differently, so "
                                  "the tokenizer is refused")


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


# which end of the post-processor's single-text template adds each token, and the tokens it may be
ENDS = {"bos": (0, ("bos_token", "cls_token")), "eos": (-1, ("eos_token", "sep_token"))}


def adds_token(tok: dict, tcfg: dict, kind: str) -> bool:
    """Whether the tokenizer puts BOS before (kind "bos") or EOS after ("eos") every encoded text, decided
    as llama.cpp's converter does: tokenizer_config.json's add_bos_token / add_eos_token when it is a bool,
    else tokenizer.json's post-processor (a TemplateProcessing whose single-text template starts / ends with
    the token, or a RobertaProcessing). With no tokenizer_config.json, the token at that end is the one."""
    if isinstance(tcfg.get(f"add_{kind}_token"), bool):
        return tcfg[f"add_{kind}_token"]
    end, names = ENDS[kind]
    like = {token_content(tcfg.get(name)) for name in names} - {None}
    post = tok.get("post_processor") or {}
    add = False
    for processor in post.get("processors", [post]):  # a Sequence lists several; the last that decides wins
        if processor.get("type") == "RobertaProcessing":
            add = True
        elif processor.get("type") == "TemplateProcessing" and len(single := processor.get("single", [])) > 1:
            if (token := single[end].get("SpecialToken", {}).get("id")) is not None:
                add = token in like or not tcfg
    return add


def special_ids(tcfg: dict, hf: dict, tokens: list[str]) -> dict[str, int]:
    """The ids of SPECIAL_TOKENS: from tokenizer_config.json, else config.json."""
    found = {key: vocab_id(tcfg.get(f"{key}_token"), tokens) for key in SPECIAL_TOKENS}
    found = {key: i if i is not None else vocab_id(hf.get(f"{key}_token_id"), tokens) for key, i in found.items()}
    return {key: i for key, i in found.items() if i is not None}


def read_tokenizer(folder: Path) -> tuple[dict, dict]:
    """tokenizer.json and tokenizer_config.json (empty when absent) of a folder."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise GGUFExportError(f"{folder} has no tokenizer.json; the GGUF file must carry the tokenizer "
                              "(copy the source model's tokenizer files into the checkpoint)")
    tcfg_path = folder / "tokenizer_config.json"
    tok = read_json(path, "the tokenizer", GGUFExportError)
    if (tok.get("model") or {}).get("type") != "BPE":
        raise GGUFExportError(f"tokenizer.json has a {(tok.get('model') or {}).get('type')!r} model; the GGUF "
                              "exporter writes BPE tokenizers only (byte-level or SentencePiece-style)")
    return tok, read_json(tcfg_path, "the tokenizer's config", GGUFExportError) if tcfg_path.is_file() else {}


def read_vocab(folder: Path, hf: dict, pre: str | None = None) -> Vocab:
    """The tokenizer of an HF folder (tokenizer.json, tokenizer_config.json, chat_template.jinja);
    pre: llama.cpp's pre-tokenizer name for a byte-level BPE, found from the tokenizer when None."""
    tok, tcfg = read_tokenizer(folder)
    check_added_tokens(tok)
    tokens, types = vocab_tokens(tok, hf["vocab_size"])
    template = tcfg.get("chat_template")
    if not isinstance(template, list):  # several named templates: gguf-py writes each under its name
        template = template_of(folder, tcfg)
    common = dict(tokens=tokens, special_ids=special_ids(tcfg, hf, tokens), add_bos=adds_token(tok, tcfg, "bos"),
                  add_eos=adds_token(tok, tcfg, "eos"), chat_template=template)
    vocab = sentencepiece_vocab(tok, types, common) if is_sentencepiece_bpe(tok) else byte_level_vocab(tok, types,
                                                                                                        common, pre)
    return replace(vocab, strips=strips(tok, vocab.tokens, vocab.types))


def byte_level_vocab(tok: dict, types: list[TokenType], common: dict, pre: str | None) -> Vocab:
    """A byte-level BPE as llama.cpp's "gpt2" vocabulary, with its merges and pre-tokenizer name."""
    if not is_byte_level(tok):
        raise GGUFExportError("tokenizer.json is a BPE that is neither byte-level (a ByteLevel pre-tokenizer) nor "
                              "SentencePiece-style (byte fallback, \"\u2581\" word markers); llama.cpp has no "
                              "tokenizer for it, so it is refused")
    pre = pre or tokenizer_pre(tok, common["tokens"])
    if pre is None:
        raise GGUFExportError("this tokenizer's pre-tokenizer split (with its ignore_merges) is not one whose "
                              "llama.cpp name is known here; "
                              "pass tokenizer_pre_name with the name llama.cpp uses for the model family "
                              "(for example llama-bpe, qwen2, smollm, gpt-2)", param="tokenizer_pre_name")
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"].get("merges", [])]
    if not merges:
        raise GGUFExportError("tokenizer.json has no BPE merges; llama.cpp cannot load a BPE tokenizer without them")
    return Vocab(model="gpt2", pre=pre, types=types, merges=merges, **common)


def sentencepiece_vocab(tok: dict, types: list[TokenType], common: dict) -> Vocab:
    """A SentencePiece-style BPE as llama.cpp's "llama" vocabulary (see spm.py)."""
    tokens, model = common["tokens"], tok["model"]
    check_added_raw(tok)
    types = spm_types(model, types)
    prefix = space_prefix(tok, tokens)
    check_merges(model, {added["content"] for added in tok.get("added_tokens", [])})
    unk = vocab_id(model.get("unk_token"), tokens)  # the BPE model's own, when nothing else names it
    if unk is not None:
        common["special_ids"].setdefault("unk", unk)
    return Vocab(model="llama", pre="default", types=types, merges=[], scores=merge_scores(model, tokens),
                 add_space_prefix=prefix, **common)


def add_vocab(w: GGUFWriter, vocab: Vocab) -> None:
    w.add_tokenizer_model(vocab.model)
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        w.add_token_scores(vocab.scores)
    w.add_token_types(vocab.types)
    if vocab.merges:
        w.add_token_merges(vocab.merges)
    for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id),
                     ("unk", w.add_unk_token_id), ("pad", w.add_pad_token_id)):
        if key in vocab.special_ids:
            add(vocab.special_ids[key])
    w.add_add_bos_token(vocab.add_bos)
    if vocab.add_eos:  # llama.cpp's default is false for both kinds; left out, files without it stay as they were
        w.add_add_eos_token(True)
    if vocab.add_space_prefix is not None:
        w.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template:
        w.add_chat_template(vocab.chat_template)
