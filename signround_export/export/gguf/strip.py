"""Spaces after special tokens: llama.cpp strips them (as Phi-3's added tokens with rstrip do) only in a file
whose general.name says phi-3, after its CONTROL, USER_DEFINED and UNKNOWN tokens and "</s>", except <unk>,
<s> and <|endoftext|>. No GGUF key carries rstrip, so the name is how the file says it, and a name saying
it wrongly would make llama.cpp tokenize the text after special tokens differently."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gguf import TokenType

from ...errors import GGUFExportError

if TYPE_CHECKING:
    from .vocab import Vocab

NAME_TAGS = ("phi-3", "phi3")
EXEMPT = ("<unk>", "<s>", "<|endoftext|>")
NEEDS = ("</s>", *EXEMPT)  # llama.cpp fails to load a file named phi-3 without any of them


def stripped_by_name(tokens: list[str], types: list[TokenType]) -> set[int]:
    """The ids llama.cpp strips the spaces after in a file named phi-3."""
    special = {i for i, t in enumerate(types) if t in (TokenType.CONTROL, TokenType.USER_DEFINED, TokenType.UNKNOWN)}
    ids = {t: i for i, t in enumerate(tokens) if t in NEEDS}
    return (special | {ids[t] for t in ("</s>",) if t in ids}) - {ids[t] for t in EXEMPT if t in ids}


def strips(tok: dict, tokens: list[str], types: list[TokenType]) -> bool | None:
    """Whether the added tokens take the spaces after them as llama.cpp's do in a file named phi-3 (True) or
    none does (False; None when llama.cpp would strip after none either). Another set is refused."""
    named = stripped_by_name(tokens, types)
    rstrip = {added["id"] for added in tok.get("added_tokens", []) if added.get("rstrip")}
    if rstrip and rstrip != named:
        differ = ", ".join(repr(tokens[i]) for i in sorted(rstrip ^ named)[:4])
        raise GGUFExportError("tokenizer.json's added tokens take the spaces after them (rstrip) other than llama.cpp "
                              f"can (all special tokens but {', '.join(EXEMPT)}; differing: {differ}): the text after "
                              "them would tokenize differently, so the tokenizer is refused")
    return bool(rstrip) if named else None


def file_name(name: str, vocab: Vocab) -> str:
    """general.name for a model named name: tagged phi3 when the tokenizer needs llama.cpp's space stripping."""
    tagged = any(tag in name.lower() for tag in NAME_TAGS)
    fix = ("rename the checkpoint folder (and _name_or_path in its config.json) without phi-3 in it"
           if not vocab.strips else "the tokenizer is refused")
    if tagged and vocab.strips is False:
        raise GGUFExportError(f"the model's name {name!r} makes llama.cpp strip the spaces after its special tokens, "
                              f"which its tokenizer does not do; {fix}")
    if (tagged or vocab.strips) and (missing := [t for t in NEEDS if t not in vocab.tokens]):
        raise GGUFExportError(f"llama.cpp strips the spaces after special tokens only in a file named phi-3, and loads "
                              f"one only with {', '.join(NEEDS)} in the vocabulary; this one lacks "
                              f"{', '.join(missing)}: {fix}")
    return f"{name} (phi3 tokenizer)" if vocab.strips and not tagged else name
