"""GGUF tokenizers: a tokenizer in the style of each family, built here with the `tokenizers` library, is
written into a GGUF file and llama.cpp's tokenization of it must equal the tokenizer's own (its post-processor
included) on multilingual text and on a rendered chat prompt; what llama.cpp would tokenize differently is
refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
import pytest
from gguf import GGUFReader
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers.tokenization_utils_base import generate_merges

from conftest import TOKENIZER_TEXT, write_tiny_model
from signround_export.cli import main
from signround_export.errors import GGUFExportError
from signround_export.export.gguf.pretokenizer import GPT4O_SPLIT, LLAMA3_SPLIT, QWEN2_SPLIT
from signround_export.export.gguf.vocab import read_vocab

try:
    import llama_cpp
except ImportError:
    llama_cpp = None
needs_llama = pytest.mark.skipif(llama_cpp is None, reason="llama-cpp-python is not installed (make setup builds it)")

TRAIN = [TOKENIZER_TEXT, "Héllo wörld, ça va très bien? Ünïcödé café naïve résumé. Grüße aus Köln.\n",
         "Привет, мир! Как дела у тебя сегодня? Всё хорошо.\n", "    indented code\n\tand tabs\n\n",
         "isn't it? they're, we've, I'm, you'll, he'd. HELLO World 2024 3.14159\n",
         "In 2024 the HTTPServer parsed camelCase JSONData and CamelCase words.\n"] * 20
SAMPLE = ("Héllo wörld, ça va? Ünïcödé café naïve. Привет, как дела? 你好，世界！こんにちは、世界。 😀 🎉👍🏽 "
          "12345 3.14159 1,000,000 a zebra In 2024, HTTPServer parsed camelCase JSONData.\n"
          "def f(x):\n    return {'a': x ** 2}  # code\n\n"
          "   leading spaces, trailing spaces   \n\tTabs\tand  multiple    spaces. isn't IT'S\n\n\nEnd ")
MESSAGES = [{"role": "system", "content": "Tu es un assistant. Réponds brièvement."},
            {"role": "user", "content": "Привет! 你好 😀 What's 2+2?  Two  spaces."},
            {"role": "assistant", "content": " Leading space and\n a newline."},
            {"role": "user", "content": "def f(x): return x  "}]

CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3_CHAT = ("{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{{ m.content }}<|eot_id|>"
               "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
GPT2_CHAT = "{% for m in messages %}{{ m.role }}: {{ m.content }}<|endoftext|>{% endfor %}"
PHI3_CHAT = ("{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
GEMMA_CHAT = ("{% for m in messages %}<start_of_turn>{{ 'model' if m.role == 'assistant' else m.role }}\n"
              "{{ m.content }}<end_of_turn>\n{% endfor %}"
              "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def byte_level(split: str | None, specials: list[str], *, digits=False, ignore_merges=False, bos=None, nfc=False):
    """A byte-level BPE: [digits one by one,] then the split regex (None: ByteLevel's own, GPT-2's)."""
    tok = Tokenizer(models.BPE())
    parts = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    if split is None:
        parts.append(pre_tokenizers.ByteLevel(add_prefix_space=False))
    else:
        parts += [pre_tokenizers.Split(Regex(split), "isolated"),
                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    tok.pre_tokenizer = parts[0] if len(parts) == 1 else pre_tokenizers.Sequence(parts)
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TRAIN, trainer=trainer)
    tok = with_whole_word(tok, "\u0120zebra")  # " zebra": a word no merge makes, only ignore_merges finds whole
    tok.model.ignore_merges = ignore_merges
    if bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    return tok


def with_whole_word(tok: Tokenizer, word: str) -> Tokenizer:
    data = json.loads(tok.to_str())
    data["model"]["vocab"][word] = tok.get_vocab_size()
    return Tokenizer.from_str(json.dumps(data))


def sentencepiece(head: list[str], specials: list[str], *, prefix: bool, extra=(), user=(), bos="<s>"):
    """A SentencePiece-style BPE laid out as transformers converts a tokenizer.model: head tokens, the 256
    byte tokens, the learned pieces (plus extra whitespace pieces), merges from the vocabulary as
    transformers derives them; spaces as "\u2581", a Prepend("\u2581") normalizer when prefix (Llama 2, Mistral,
    Phi-3), only the replacement and a no-op split on spaces otherwise (Gemma)."""
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.Metaspace()
    learner.train_from_iterator(TRAIN, trainer=trainers.BpeTrainer(vocab_size=500, show_progress=False))
    pieces = [t for t, _ in sorted(learner.get_vocab().items(), key=lambda kv: kv[1])]
    order = head + [f"<0x{b:02X}>" for b in range(256)] + pieces + [t for t in extra if t not in pieces]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(order))}
    tok = Tokenizer(models.BPE(vocab, generate_merges(vocab), unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    replace = normalizers.Replace(" ", "\u2581")
    if prefix:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), replace])
    else:
        tok.normalizer = replace
        tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in head + specials])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, vocab[bos])])
    return tok


def family(name: str):
    """(tokenizer, tokenizer_config.json, llama.cpp's pre-tokenizer name, space prefix) of a family's style."""
    chatml = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    if name == "llama3":
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
        tok = byte_level(LLAMA3_SPLIT, specials, ignore_merges=True, bos="<|begin_of_text|>")
        tcfg = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA3_CHAT}
        return tok, tcfg, "llama-bpe"
    if name == "smaug":  # Llama 3's split without ignore_merges
        tok = byte_level(LLAMA3_SPLIT, ["<|begin_of_text|>", "<|end_of_text|>"], bos="<|begin_of_text|>")
        return tok, {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "chat_template": GPT2_CHAT
                     .replace("<|endoftext|>", "<|end_of_text|>")}, "smaug-bpe"
    if name == "qwen2":
        tok = byte_level(QWEN2_SPLIT, chatml, nfc=True)
        return tok, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": CHATML}, "qwen2"
    if name == "gpt-4o":
        return byte_level(GPT4O_SPLIT, chatml), {"eos_token": "<|im_end|>", "chat_template": CHATML}, "gpt-4o"
    if name == "gpt-2":
        tok = byte_level(None, ["<|endoftext|>"])
        return tok, {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "chat_template": GPT2_CHAT}, "gpt-2"
    if name == "smollm":
        tok = byte_level(None, chatml, digits=True)
        return tok, {"eos_token": "<|im_end|>", "chat_template": CHATML}, "smollm"
    if name == "llama2":  # Llama 2 / Mistral / TinyLlama / Phi-3 layout, Phi-3's chat tokens
        specials = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
        tok = sentencepiece(["<unk>", "<s>", "</s>"], specials, prefix=True, user=["<tool>"])
        return tok, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
                     "add_eos_token": False, "chat_template": PHI3_CHAT}, "default"
    if name == "phi3":  # Phi-3's chat tokens take the spaces after them, as llama.cpp's do in a file named phi-3
        tok, tcfg, pre = family("llama2")
        data = json.loads(tok.to_str())
        for added in data["added_tokens"]:
            added["rstrip"] = added["content"] not in ("<unk>", "<s>", "<|endoftext|>")
        return Tokenizer.from_str(json.dumps(data)), tcfg, pre
    assert name == "gemma"
    tok = sentencepiece(["<pad>", "<eos>", "<bos>", "<unk>"], ["<start_of_turn>", "<end_of_turn>"], prefix=False,
                        extra=["\n", "\n\n", "\t", "\u2581\u2581", "\u2581\u2581\u2581\u2581"], bos="<bos>")
    return tok, {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
                 "add_bos_token": True, "chat_template": GEMMA_CHAT}, "default"


FAMILIES = ["llama3", "smaug", "qwen2", "gpt-4o", "gpt-2", "smollm", "llama2", "phi3", "gemma"]


def model_folder(tmp: Path, tok: Tokenizer, tcfg: dict) -> Path:
    folder = write_tiny_model(tmp / "model", tokenizer=tok)
    (folder / "tokenizer_config.json").write_text(json.dumps(tcfg))
    return folder


def gguf_of(folder: Path, out: Path) -> Path:
    assert main(["export", "gguf", str(folder), "--bits", "16", "--out", str(out), "--quiet"]) == 0
    return out


def metadata(path: Path) -> dict:
    fields = GGUFReader(path).fields
    keys = ("general.name", "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.add_bos_token",
            "tokenizer.ggml.add_space_prefix", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.unknown_token_id")
    return {k.rsplit(".", 1)[1]: fields[k].contents() for k in keys if k in fields}


def meta_bos(path: Path) -> bool:
    return metadata(path)["add_bos_token"]


@pytest.fixture(scope="module", params=FAMILIES)
def written(request, tmp_path_factory):
    tok, tcfg, pre = family(request.param)
    folder = model_folder(tmp_path_factory.mktemp(request.param), tok, tcfg)
    return request.param, folder, pre, gguf_of(folder, folder.parent / "m.gguf")


def test_the_file_names_the_tokenizer(written):
    name, folder, pre, path = written
    meta = metadata(path)
    spm = name in ("llama2", "phi3", "gemma")
    assert meta["model"] == ("llama" if spm else "gpt2") and meta["pre"] == pre
    assert meta["add_bos_token"] is (name in ("llama3", "smaug", "llama2", "phi3", "gemma"))
    assert ("phi3" in meta["name"]) is (name == "phi3")  # how llama.cpp knows to strip after the chat tokens
    if spm:  # Gemma puts no "\u2581" before the text
        assert meta["add_space_prefix"] is (name != "gemma")
        assert meta["unknown_token_id"] == Tokenizer.from_file(str(folder / "tokenizer.json")).token_to_id("<unk>")


@needs_llama
def test_llama_cpp_tokenizes_as_the_tokenizer(written):
    name, folder, _, path = written
    hf = Tokenizer.from_file(str(folder / "tokenizer.json"))
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    want = hf.encode(SAMPLE).ids  # with the post-processor: BOS where the family adds it
    assert llm.tokenize(SAMPLE.encode(), add_bos=True, special=False) == want
    prompt = jinja2.Template(json.loads((folder / "tokenizer_config.json").read_text())["chat_template"]).render(
        messages=MESSAGES, add_generation_prompt=True)
    chat = hf.encode(prompt).ids
    assert llm.tokenize(prompt.encode(), add_bos=True, special=True) == chat
    assert len(chat) > len(hf.encode(prompt, add_special_tokens=False).ids) or not meta_bos(path)
    for text in (" leading", "x", "Привет", "\n\nend  ", "a<tool>b"):  # edges: a first space, one letter, a user token
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == hf.encode(text).ids, text


@needs_llama
def test_llama_cpp_detokenizes_to_the_text(written):
    name, _, _, path = written
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    ids = llm.tokenize(SAMPLE.encode(), add_bos=False, special=False)
    # llama.cpp renders the "\u2581" it put before the text as a space
    assert llm.detokenize(ids).decode() == (" " if name in ("llama2", "phi3") else "") + SAMPLE


def spm_folder(tmp_path, edit) -> Path:
    """A Llama-2-style folder whose tokenizer.json `edit` changes."""
    tok, tcfg, _ = family("llama2")
    folder = model_folder(tmp_path, tok, tcfg)
    path = folder / "tokenizer.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return folder


def refused(folder: Path, match: str):
    hf = json.loads((folder / "config.json").read_text())
    with pytest.raises(GGUFExportError, match=match):
        read_vocab(folder, hf)


def test_sentencepiece_merges_llama_cpp_cannot_reproduce_are_refused(tmp_path):
    def drop_a_merge(tok):  # its token stays, so llama.cpp would still join the two pieces
        tok["model"]["merges"] = [m for m in tok["model"]["merges"] if m != ["\u2581", "t"]]
    refused(spm_folder(tmp_path / "a", drop_a_merge), r"'\u2581' \+ 't' make the token '\u2581t' but are not one")

    def interleave(tok):  # "▁▁▁" made by two merges far apart: llama.cpp has one score for both
        vocab, sp = tok["model"]["vocab"], "▁"
        vocab.update({sp * 2: len(vocab), sp * 3: len(vocab) + 1})
        tok["model"]["merges"] = [[sp, sp], [sp * 2, sp]] + tok["model"]["merges"] + [[sp, sp * 2]]
    refused(spm_folder(tmp_path / "b", interleave), "are not consecutive")


def test_sentencepiece_shapes_llama_cpp_lacks_are_refused(tmp_path):
    def metaspace(tok):  # transformers' non-legacy Llama: prepends only where no space is
        tok["normalizer"] = None
        tok["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False}
    refused(spm_folder(tmp_path / "a", metaspace), "Metaspace pre-tokenizer prepends")

    def drop_a_byte(tok):
        tok["model"]["vocab"].pop("<0x7F>")
    refused(spm_folder(tmp_path / "b", drop_a_byte), "255 of the 256 byte tokens")

    def nfkc(tok):
        tok["normalizer"]["normalizers"].append({"type": "NFKC"})
    refused(spm_folder(tmp_path / "c", nfkc), "normalizer has a NFKC step")

    def rstrip(tok):  # one chat token of Phi-3's set: llama.cpp strips after all of them or none
        tok["added_tokens"][-2]["rstrip"] = True
    refused(spm_folder(tmp_path / "d", rstrip), r"take the spaces after them \(rstrip\) other than llama.cpp can")

    def lstrip(tok):
        tok["added_tokens"][-2]["lstrip"] = True
    refused(spm_folder(tmp_path / "e", lstrip), "'<\\|end\\|>' has lstrip")


def test_byte_level_splits_llama_cpp_lacks_are_refused(tmp_path):
    tok = byte_level(QWEN2_SPLIT, ["<|endoftext|>"], ignore_merges=True)  # no llama.cpp name has both
    refused(model_folder(tmp_path / "a", tok, {}), r"split \(with its ignore_merges\) is not one")
    tok = byte_level(r"\p{L}+|\p{N}+|\s+|[^\s\p{L}\p{N}]+", ["<|end_of_text|>"])
    refused(model_folder(tmp_path / "b", tok, {}), "pass tokenizer_pre_name")
    words = Tokenizer(models.BPE())
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.train_from_iterator(TRAIN, trainer=trainers.BpeTrainer(vocab_size=300, show_progress=False))
    refused(model_folder(tmp_path / "c", words, {}), "neither byte-level")


@needs_llama
def test_a_refused_shape_does_tokenize_differently_in_llama_cpp(tmp_path, monkeypatch):
    """The refusals are not caution: written anyway, transformers' non-legacy Metaspace (prepend only where no
    space is) loses a "\u2581" llama.cpp keeps, on text that starts with a space."""
    from signround_export.export.gguf import vocab

    def metaspace(tok):
        tok["normalizer"] = None
        tok["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always",
                                "split": False}
    folder = spm_folder(tmp_path, metaspace)
    monkeypatch.setattr(vocab, "space_prefix", lambda tok, tokens: True)
    llm = llama_cpp.Llama(str(gguf_of(folder, tmp_path / "m.gguf")), vocab_only=True, verbose=False)
    hf = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert llm.tokenize(b"plain text", add_bos=True) == hf.encode("plain text").ids
    assert llm.tokenize(b" x", add_bos=True) != hf.encode(" x").ids


@needs_llama
def test_eos_the_post_processor_adds_is_added_by_llama_cpp(tmp_path):
    tok, tcfg, _ = family("llama2")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", pair="<s> $A </s> <s> $B </s>",
                                                       special_tokens=[("<s>", 1), ("</s>", 2)])
    folder = model_folder(tmp_path, tok, {k: v for k, v in tcfg.items() if k != "add_eos_token"})
    path = gguf_of(folder, tmp_path / "m.gguf")
    assert GGUFReader(path).fields["tokenizer.ggml.add_eos_token"].contents() is True
    want = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(SAMPLE).ids
    assert want[0] == 1 and want[-1] == 2
    assert llama_cpp.Llama(str(path), vocab_only=True, verbose=False).tokenize(SAMPLE.encode(), add_bos=True) == want


def test_a_phi_3_name_needs_the_tokenizer_llama_cpp_expects_of_it(tmp_path):
    """llama.cpp strips spaces after the special tokens of any file named phi-3, and loads one only with
    </s>, <unk>, <s> and <|endoftext|> in its vocabulary: a name that would mislead it is refused."""
    from signround_export.export.gguf.strip import file_name

    tok, tcfg, _ = family("llama2")
    folder = model_folder(tmp_path / "a", tok, tcfg)
    plain = read_vocab(folder, json.loads((folder / "config.json").read_text()))
    assert plain.strips is False and file_name("my-llama", plain) == "my-llama"
    with pytest.raises(GGUFExportError, match="'Phi-3-mini' makes llama.cpp strip the spaces .* rename the checkpoint"):
        file_name("Phi-3-mini", plain)
    tok, tcfg, _ = family("gpt-2")
    folder = model_folder(tmp_path / "b", tok, tcfg)
    gpt2 = read_vocab(folder, json.loads((folder / "config.json").read_text()))
    assert gpt2.strips is None and file_name("tiny", gpt2) == "tiny"
    with pytest.raises(GGUFExportError, match="lacks </s>, <unk>, <s>: rename"):
        file_name("tiny-phi3", gpt2)
