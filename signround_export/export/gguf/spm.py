"""SentencePiece-style BPE (Llama 2, Mistral 7B, TinyLlama, Phi-3, Gemma) as llama.cpp's "llama" vocabulary.

Such a tokenizer.json marks words with "\u2581" and falls back to <0xNN> byte tokens. llama.cpp tokenizes it
its own way: every space becomes "\u2581" (one more in front of the text and after every special token when
add_space_prefix is set), then neighbours are merged whenever their concatenation is a token, the one with
the highest score first, ties to the left. That equals the tokenizer's BPE when every split of a token into
two tokens is one of its merges and the merges making one token are consecutive: the scores are then the
merge ranks (as the converter's SentencePiece scores are for a model converted from tokenizer.model).
Anything else is refused by name rather than written to tokenize differently."""

from __future__ import annotations

import re

from gguf import TokenType

from ...errors import GGUFExportError
from .pretokenizer import steps

SPACE = "\u2581"
BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")  # llama.cpp looks the fallback bytes up by this spelling


def is_byte_level(tok: dict) -> bool:
    return any(p.get("type") == "ByteLevel" for p in steps(tok.get("pre_tokenizer")))


def is_sentencepiece_bpe(tok: dict) -> bool:
    """A BPE model in SentencePiece's manner: bytes as <0xNN> fallback tokens, words marked by "\u2581"."""
    model = tok.get("model") or {}
    vocab = model.get("vocab") or {}
    return not is_byte_level(tok) and (bool(model.get("byte_fallback")) or "<0x0A>" in vocab
                                       or any(t.startswith(SPACE) for t in vocab))


def refuse(why: str) -> GGUFExportError:
    return GGUFExportError(f"tokenizer.json is a SentencePiece-style BPE that llama.cpp would tokenize differently: "
                           f"{why}; it is refused rather than written with wrong tokens")


def spm_types(model: dict, types: list[TokenType]) -> list[TokenType]:
    """The token types with the byte-fallback tokens as BYTE and the model's unknown token as UNKNOWN."""
    out = list(types)
    found = set()
    for text, i in model["vocab"].items():
        if BYTE_TOKEN.fullmatch(text) and types[i] == TokenType.NORMAL:
            out[i] = TokenType.BYTE
            found.add(text)
    if len(found) < 256:
        raise refuse(f"it has {len(found)} of the 256 byte tokens <0x00>..<0xFF> (llama.cpp needs every byte to fall "
                     "back to)")
    if (unk := model.get("unk_token")) in model["vocab"]:
        out[model["vocab"][unk]] = TokenType.UNKNOWN
    return out


def merge_pairs(model: dict) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]


def check_merges(model: dict, added: set[str]) -> None:
    """Refuse merges llama.cpp cannot reproduce by scores: see the module's docstring. Added tokens are
    matched whole before BPE, on both sides, so only the model's own tokens are checked."""
    merges = merge_pairs(model)
    listed, made, last = set(merges), set(), None
    for a, b in merges:
        if a + b != last:
            if a + b in made:
                raise refuse(f"the merges making {a + b!r} are not consecutive")
            made.add(a + b)
            last = a + b
    vocab = model["vocab"]
    for token in vocab:
        if token in added:
            continue
        for i in range(1, len(token)):
            a, b = token[:i], token[i:]
            if (a in vocab or len(a) == 1) and (b in vocab or len(b) == 1) and (a, b) not in listed:
                raise refuse(f"{a!r} + {b!r} make the token {token!r} but are not one of its merges")


def merge_scores(model: dict, tokens: list[str]) -> list[float]:
    """Each token's score for llama.cpp: minus the rank of its first merge; 0 for tokens no merge makes
    (single characters, bytes, added tokens), which are never the result of joining two neighbours."""
    first: dict[str, int] = {}
    for rank, (a, b) in enumerate(merge_pairs(model)):
        first.setdefault(a + b, rank)
    return [-float(first[t]) if t in first else 0.0 for t in tokens]


def space_prefix(tok: dict, tokens: list[str]) -> bool:
    """llama.cpp's add_space_prefix: whether the tokenizer puts "\u2581" before the text, read from a Prepend
    normalizer. Every space must become "\u2581" (a Replace normalizer, or a Metaspace that prepends nothing)."""
    prepend = replace = False
    for n in steps(tok.get("normalizer")):
        if n.get("type") == "Prepend" and n.get("prepend") == SPACE:
            prepend = True
        elif n.get("type") == "Replace" and n.get("pattern") == {"String": " "} and n.get("content") == SPACE:
            replace = True
        else:
            raise refuse(f"its normalizer has a {n.get('type')} step llama.cpp does not apply")
    for p in steps(tok.get("pre_tokenizer")):
        if p.get("type") == "Metaspace" and p.get("replacement") == SPACE:
            scheme = p.get("prepend_scheme", "always" if p.get("add_prefix_space", True) else "never")
            if scheme != "never":  # it prepends only where the text does not start with a space already
                raise refuse(f"its Metaspace pre-tokenizer prepends \"\u2581\" ({scheme}) only where no space is, "
                             "llama.cpp always does (text starting with a space, text after a special token)")
            if p.get("split", True) and any(SPACE in t[1:] for t in tokens):
                raise refuse("its Metaspace pre-tokenizer splits words apart, and tokens span words")
            replace = True
        elif not (p.get("type") == "Split" and p.get("pattern") == {"String": " "} and replace):
            raise refuse(f"its pre-tokenizer has a {p.get('type')} step llama.cpp does not apply")
    if not replace:
        raise refuse("it does not turn spaces into \"\u2581\" as llama.cpp does")
    return prepend


def check_added_raw(tok: dict) -> None:
    """Added tokens matched on normalized text would be found where llama.cpp does not look for them."""
    for added in tok.get("added_tokens", []):
        if added.get("normalized"):
            raise refuse(f"the added token {added['content']!r} is matched after normalization")
