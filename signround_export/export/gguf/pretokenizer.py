"""llama.cpp's pre-tokenizer name (tokenizer.ggml.pre) for a byte-level BPE tokenizer: found from the
vocabulary for the models known by it, else from the split tokenizer.json applies before its byte-level
step. llama.cpp does not read the split from the file: it has one compiled in per name."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from ...errors import GGUFExportError

# The pre-tokenizer names llama.cpp knows, by the sha256 of the vocabulary (tokens by id, joined by
# newlines). Families that share a vocabulary share the pre-tokenizer.
KNOWN_VOCABS = {
    "d1f2ce856b324081b621d9e2e8dbd22879f462329f3fd4aa39fa758dddb2ce55": "smollm",  # SmolLM, SmolLM2
}

GPT2_SPLIT = "gpt2"  # ByteLevel's own regex (use_regex=True)
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT4O_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
               r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
               r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
               r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
               r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class Split:
    """What a byte-level tokenizer does before BPE: its split regex, and digits split one by one first."""
    regex: str
    digits: bool = False


# llama.cpp's name for each split it implements, by the split and whether a word found whole in the vocabulary
# is taken without merging (the tokenizer's ignore_merges: llama.cpp fixes it per name)
SPLITS = {
    (Split(GPT2_SPLIT), False): "gpt-2",
    (Split(GPT2_SPLIT, digits=True), False): "smollm",
    (Split(LLAMA3_SPLIT), True): "llama-bpe",
    (Split(LLAMA3_SPLIT), False): "smaug-bpe",  # Llama 3's split, every word merged
    (Split(QWEN2_SPLIT), False): "qwen2",
    (Split(GPT4O_SPLIT), False): "gpt-4o",
}
NORMALIZERS = ([], ["NFC"])  # llama.cpp normalizes nothing; NFC (Qwen) changes only text that is not NFC already


def steps(component: dict | None) -> list[dict]:
    """A tokenizer.json normalizer or pre-tokenizer as its list of steps (a Sequence flattened)."""
    if not component:
        return []
    if component.get("type") == "Sequence":
        inner = component.get("pretokenizers", component.get("normalizers", []))
        return [s for c in inner for s in steps(c)]
    return [component]


def split_of(tok: dict) -> Split | None:
    """The split a byte-level tokenizer.json applies, None when it is not one of the shapes read here:
    [Digits(individual)] then either ByteLevel with its regex or a Split(regex, isolated) and ByteLevel without."""
    parts = steps(tok.get("pre_tokenizer"))
    digits = bool(parts) and parts[0].get("type") == "Digits" and parts[0].get("individual_digits") is True
    parts = parts[1:] if digits else parts
    if not parts or parts[-1].get("type") != "ByteLevel" or parts[-1].get("add_prefix_space"):
        return None
    if len(parts) == 1 and parts[0].get("use_regex", True):
        return Split(GPT2_SPLIT, digits)
    split = parts[0]
    if (len(parts) == 2 and not parts[1].get("use_regex", True) and split.get("type") == "Split"
            and split.get("behavior") == "Isolated" and not split.get("invert")
            and "Regex" in split.get("pattern", {})):
        return Split(split["pattern"]["Regex"], digits)
    return None


def pre_from_split(tok: dict) -> str | None:
    """llama.cpp's name for the tokenizer's split, None when llama.cpp has none for it; a split it knows
    after a normalization it lacks is refused by name."""
    name = SPLITS.get((split_of(tok), bool(tok["model"].get("ignore_merges"))))
    normalizer = [n.get("type") for n in steps(tok.get("normalizer"))]
    if name is not None and normalizer not in NORMALIZERS:
        raise GGUFExportError(f"tokenizer.json normalizes text ({', '.join(normalizer)}) before the {name!r} split; "
                              "llama.cpp does not, so it would tokenize such text differently and is refused")
    return name


def tokenizer_pre(tok: dict, tokens: list[str]) -> str | None:
    """llama.cpp's pre-tokenizer name for a byte-level tokenizer: by its vocabulary when llama.cpp knows
    it, else by its split; None when neither is known."""
    known = KNOWN_VOCABS.get(hashlib.sha256("\n".join(tokens).encode()).hexdigest())
    return known or pre_from_split(tok)
