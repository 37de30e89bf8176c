"""Calibration windows: stream mode as before, documents mode (windows inside one document, BOS where the
tokenizer adds one), mixtures of sources, and `self` (sequences sampled from the float model)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from pydoc_data.topics import topics

import pytest
import torch
from tokenizers import Tokenizer, processors

import signround_export as sr
from safetensors.torch import load_file

from conftest import make_tokenizer, write_tiny_model
from signround_export.data import bos_prefix, calibration_ids, load_tokenizer
from signround_export.errors import DataError
from signround_export.model.folder import SELF_CALIBRATION_FILE
from signround_export.selfcalib import self_calibration_ids

# documents of disjoint alphabets (disjoint tokens), random so that no two windows are alike
DOCS = ["".join(random.Random(i).choices(alphabet, k=400)) for i, alphabet in
        enumerate(["abcdefgh", "0123456789", "()[]{}<>"])]


def tokenizer_folder(folder: Path, *, bos: bool = False, config: dict | None = None) -> Path:
    """A folder with the tiny BPE tokenizer; bos: its post-processor puts <|endoftext|> (id 0) first."""
    folder.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer()
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<|endoftext|> $A", pair="<|endoftext|> $A $B", special_tokens=[("<|endoftext|>", 0)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config or {"eos_token": "<|endoftext|>"}))
    return folder


def ids_of(folder: Path, text: str) -> list[int]:
    return load_tokenizer(folder).encode(text, add_special_tokens=False).ids


def old_calibration_ids(folder, nsamples, seqlen, seed, path=None) -> torch.Tensor:
    """The oracle: calibration_ids as it was before documents and mixtures (one stream, no BOS)."""
    tok = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
    if path is None:
        text = "\n\n".join(t for i, t in enumerate(topics[k] for k in sorted(topics)) if i % 10 != 9)
    elif Path(path).suffix == ".jsonl":
        text = "\n\n".join(json.loads(line)["text"] for line in Path(path).read_text().splitlines() if line.strip())
    else:
        text = Path(path).read_text()
    ids = torch.tensor(tok.encode(text, add_special_tokens=False).ids, dtype=torch.long)
    n = ids.numel() // seqlen
    pick = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:nsamples].sort().values
    return ids[: n * seqlen].view(n, seqlen)[pick]


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


@pytest.mark.parametrize("seed", [0, 7, 42])
def test_stream_mode_gives_the_ids_of_before(tmp_path, seed):
    folder = tokenizer_folder(tmp_path / "tok")
    jsonl = write_jsonl(tmp_path / "d.jsonl", DOCS)
    (tmp_path / "t.txt").write_text(" ".join(DOCS))
    for calib in (None, jsonl, tmp_path / "t.txt", str(jsonl)):
        assert torch.equal(calibration_ids(folder, 6, 32, seed, calib), old_calibration_ids(folder, 6, 32, seed, calib))
    assert torch.equal(calibration_ids(folder, 16, 128, seed), old_calibration_ids(folder, 16, 128, seed))


def test_bos_prefix_follows_the_post_processor_and_tokenizer_config(tmp_path):
    plain, with_bos = tokenizer_folder(tmp_path / "plain"), tokenizer_folder(tmp_path / "bos", bos=True)
    assert bos_prefix(plain, load_tokenizer(plain)) == []
    assert bos_prefix(with_bos, load_tokenizer(with_bos)) == [0]
    # an explicit add_bos_token decides, as transformers rebuilds the post-processor from it
    off = tokenizer_folder(tmp_path / "off", bos=True, config={"add_bos_token": False, "bos_token": "<|endoftext|>"})
    on = tokenizer_folder(tmp_path / "on", config={"add_bos_token": True, "bos_token": {"content": "<|endoftext|>"}})
    assert bos_prefix(off, load_tokenizer(off)) == []
    assert bos_prefix(on, load_tokenizer(on)) == [0]


@pytest.mark.parametrize("bos", [False, True])
def test_document_windows_stay_inside_one_document(tmp_path, bos):
    folder = tokenizer_folder(tmp_path / "tok", bos=bos)
    jsonl = write_jsonl(tmp_path / "d.jsonl", DOCS)
    doc_ids = [ids_of(folder, d) for d in DOCS]
    assert all(not set(a) & set(b) for a, b in zip(doc_ids, doc_ids[1:] + doc_ids[:1]))
    seqlen, body = 16, 16 - bos
    starts = {tuple(ids[k * body:(k + 1) * body]) for ids in doc_ids for k in range(len(ids) // body)}
    rows = calibration_ids(folder, 12, seqlen, 3, jsonl, windows="documents")
    assert rows.shape == (12, seqlen) and rows.dtype == torch.long
    assert len({tuple(r.tolist()) for r in rows}) == 12
    for row in rows.tolist():
        assert (row[0] == 0) == bos
        assert tuple(row[bos:]) in starts  # a window from a document's start, in steps of its length
    assert not torch.equal(rows, calibration_ids(folder, 12, seqlen, 4, jsonl, windows="documents"))


def test_too_few_document_windows_name_the_counts(tmp_path):
    folder = tokenizer_folder(tmp_path / "tok", bos=True)
    jsonl = write_jsonl(tmp_path / "d.jsonl", DOCS)
    have = sum(len(ids_of(folder, d)) // 63 for d in DOCS)
    with pytest.raises(DataError, match=rf"d.jsonl gives {have} windows of 64 tokens \(documents.*fewer than "
                                        rf"`nsamples` 40.*`calib_windows` \"stream\"") as raised:
        calibration_ids(folder, 40, 64, 0, jsonl, windows="documents")
    assert raised.value.param == "nsamples"
    with pytest.raises(DataError, match="`calib_windows` 'lines'"):
        calibration_ids(folder, 4, 64, 0, jsonl, windows="lines")


def test_a_mixture_splits_nsamples_and_orders_rows_by_source(tmp_path):
    folder = tokenizer_folder(tmp_path / "tok")
    a = tmp_path / "a.txt"
    a.write_text(DOCS[0] + DOCS[2])
    b = write_jsonl(tmp_path / "b.jsonl", DOCS[1:2] * 3)
    for windows in ("stream", "documents"):
        rows = calibration_ids(folder, 5, 16, 9, f"{a},{b}", windows=windows)
        assert torch.equal(rows[:3], calibration_ids(folder, 3, 16, 9, a, windows=windows))
        assert torch.equal(rows[3:], calibration_ids(folder, 2, 16, 9, b, windows=windows))
    digits = set(ids_of(folder, DOCS[1]))
    assert all(set(r.tolist()) <= digits for r in rows[3:]) and not any(set(r.tolist()) & digits for r in rows[:3])
    default_rows = calibration_ids(folder, 4, 16, 9, f" {b} ,{a}")
    assert torch.equal(default_rows[:2], calibration_ids(folder, 2, 16, 9, b))


def test_a_mixture_refuses_a_short_source_with_every_count(tmp_path):
    folder = tokenizer_folder(tmp_path / "tok")
    short = tmp_path / "short.txt"
    short.write_text(DOCS[1][:20])
    long = tmp_path / "long.txt"
    long.write_text(DOCS[0])
    n_short, n_long = len(ids_of(folder, DOCS[1][:20])) // 8, len(ids_of(folder, DOCS[0])) // 8
    with pytest.raises(DataError, match=rf"too few windows of 8 tokens \(stream\) for `nsamples` 9: .*long.txt gives "
                                        rf"{n_long} \(its share: 5\); .*short.txt gives {n_short} \(its share: 4\)"):
        calibration_ids(folder, 9, 8, 0, f"{long},{short}")
    with pytest.raises(DataError, match="empty source") as raised:
        calibration_ids(folder, 4, 8, 0, f"{long},,{short}")
    assert raised.value.param == "calib"
    with pytest.raises(DataError, match="missing.jsonl does not exist"):
        calibration_ids(folder, 4, 8, 0, f"{long},{tmp_path / 'missing.jsonl'}")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": ["a list"]}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: the \"text\" field holds a list"):
        calibration_ids(folder, 4, 8, 0, bad)


def test_tune_records_the_windows_and_the_spec(tiny_model, tmp_path):
    a = tmp_path / "a.txt"
    a.write_text(" ".join(DOCS) * 4)
    b = write_jsonl(tmp_path / "b.jsonl", DOCS * 3)
    with pytest.raises(sr.TuneError, match="`calib_windows` 'lines'") as raised:
        sr.quantize(tiny_model, tmp_path / "c", iters=1, nsamples=4, seqlen=32, batch_size=2,
                    calib=f"{a},{b}", calib_windows="lines", progress=False)
    assert raised.value.param == "calib_windows"
    sr.quantize(tiny_model, tmp_path / "c", iters=1, nsamples=4, seqlen=32, batch_size=2,
                calib=f"{a},{b}", calib_windows="documents", progress=False)
    log = json.loads((tmp_path / "c" / "tuning_log.json").read_text())
    assert log["calibration"] == f"{a},{b}" and log["args"]["calib_windows"] == "documents"


# -- `self`: sequences sampled from the float model ------------------------------------------------------


@pytest.fixture(scope="module")
def peaked_model(tmp_path_factory) -> Path:
    """A tiny model whose next-token distributions are sharp (the final norm scaled up), so that samples
    from it are recognisably its own; its tokenizer puts BOS (id 0) first."""
    from safetensors.torch import load_file, save_file

    tok = make_tokenizer()
    tok.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A", pair="<|endoftext|> $A $B",
                                                       special_tokens=[("<|endoftext|>", 0)])
    folder = write_tiny_model(tmp_path_factory.mktemp("peaked") / "model", tokenizer=tok)
    state = load_file(folder / "model.safetensors")
    state["model.norm.weight"] *= 6
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_self_sequences_are_samples_of_the_model(peaked_model, monkeypatch):
    from transformers import AutoModelForCausalLM

    from signround_export.tune import signround

    monkeypatch.setattr(signround, "pick_dtype", lambda device: torch.float32)  # compared with float32 below
    ids = self_calibration_ids(peaked_model, 20, 32, 0, progress=False)
    assert ids.shape == (20, 32) and ids.dtype == torch.long
    assert torch.equal(ids, self_calibration_ids(peaked_model, 20, 32, 0, progress=False))
    assert not torch.equal(ids, self_calibration_ids(peaked_model, 20, 32, 1, progress=False))
    assert (ids[:, 0] == 0).all() and (ids[:, 1] != 0).all()  # BOS, then a random token that is not special
    assert len(set(ids[:, 1].tolist())) > 10
    model = AutoModelForCausalLM.from_pretrained(peaked_model, dtype=torch.float32).eval()
    with torch.no_grad():  # one forward without a cache over the whole sequences
        logp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
    greedy = logp[:, 1:4].gather(-1, ids[:, 2:5, None])[..., 0]  # three greedy tokens after the random one
    assert torch.allclose(greedy, logp[:, 1:4].max(-1).values, atol=1e-4)  # (the cache's rounding: near-ties)
    sampled = logp[:, 4:-1].gather(-1, ids[:, 5:, None]).mean()
    entropy = -(logp[:, 4:-1].exp() * logp[:, 4:-1]).sum(-1).mean()
    # a sample's mean log-probability is minus the entropy; uniform tokens would score far lower
    assert abs(sampled + entropy) < 0.2 and logp[:, 4:-1].mean() < sampled - 5


def test_self_ids_are_cached_and_regenerated_on_a_mismatch(tiny_model, tmp_path, monkeypatch):
    from signround_export import selfcalib

    ids = self_calibration_ids(tiny_model, 4, 32, 5, tmp_path, progress=False)
    assert (tmp_path / SELF_CALIBRATION_FILE).is_file()
    loads = []
    real = selfcalib.load_generator_model
    monkeypatch.setattr(selfcalib, "load_generator_model", lambda folder, progress=True: loads.append(folder) or real(folder, progress))
    assert torch.equal(self_calibration_ids(tiny_model, 4, 32, 5, tmp_path, progress=False), ids) and not loads
    other = self_calibration_ids(tiny_model, 4, 32, 6, tmp_path, progress=False)
    assert len(loads) == 1 and not torch.equal(other, ids)
    assert torch.equal(self_calibration_ids(tiny_model, 4, 32, 6, tmp_path, progress=False), other) and len(loads) == 1
    assert self_calibration_ids(tiny_model, 3, 32, 6, tmp_path, progress=False).shape == (3, 32) and len(loads) == 2
    (tmp_path / SELF_CALIBRATION_FILE).write_bytes(b"damaged")
    assert torch.equal(self_calibration_ids(tiny_model, 4, 32, 5, tmp_path, progress=False), ids) and len(loads) == 3


def test_self_in_a_mixture_takes_its_share(tiny_model, tmp_path):
    a = tmp_path / "a.txt"
    a.write_text(" ".join(DOCS))
    rows = calibration_ids(tiny_model, 5, 32, 3, f"{a},self", windows="documents", cache_dir=tmp_path, progress=False)
    assert torch.equal(rows[:3], calibration_ids(tiny_model, 3, 32, 3, a, windows="documents"))
    assert torch.equal(rows[3:], self_calibration_ids(tiny_model, 2, 32, 3, progress=False))


def test_tune_on_self_keeps_the_ids_in_the_checkpoint(tiny_model, tmp_path, monkeypatch):
    from signround_export import selfcalib
    from signround_export.tune import pipeline

    settings = dict(iters=1, nsamples=4, seqlen=32, batch_size=2, calib="self", progress=False)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "tune", killed)
    with pytest.raises(KeyboardInterrupt):
        sr.quantize(tiny_model, tmp_path / "c", **settings)
    assert (tmp_path / "c.progress" / SELF_CALIBRATION_FILE).is_file()
    monkeypatch.undo()

    def no_model(folder, progress=True):
        raise AssertionError("the rerun loads the float model again")

    monkeypatch.setattr(selfcalib, "load_generator_model", no_model)  # the rerun reuses the killed run's ids
    sr.quantize(tiny_model, tmp_path / "c", **settings)
    kept = tmp_path / "c" / SELF_CALIBRATION_FILE
    assert kept.is_file() and not (tmp_path / "c.progress").exists()
    monkeypatch.undo()
    assert torch.equal(self_calibration_ids(tiny_model, 4, 32, 42, progress=False), load_file(kept)["ids"])
    assert json.loads((tmp_path / "c" / "tuning_log.json").read_text())["calibration"] == "self"
    ckpt = sr.read_checkpoint(tmp_path / "c")  # the extra file is not a weight file
    assert len(ckpt.qweights) == 14
    sr.export_gguf(tmp_path / "c", tmp_path / "c.gguf", progress=False)
    assert sr.evaluate(tmp_path / "c", window=32, windows=2, progress=False).ppl > 1


def test_cli_takes_a_spec_and_the_windows_mode(tiny_model, tmp_path, capsys):
    from signround_export.cli import main

    a = tmp_path / "a.txt"
    a.write_text(DOCS[0])
    b = write_jsonl(tmp_path / "b.jsonl", DOCS[1:] * 2)
    tune = ["tune", str(tiny_model), "--out", str(tmp_path / "c"), "--iters", "1", "--seqlen", "32",
            "--batch-size", "2", "--calib", f"{a},{b}", "--calib-windows", "documents", "--quiet"]
    assert main(tune + ["--nsamples", "400"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "a.txt gives" in err and "b.jsonl gives" in err
    assert "lower --nsamples or --seqlen" in err and "--calib-windows \"stream\"" in err
    assert main(tune + ["--nsamples", "4"]) == 0
    assert json.loads((tmp_path / "c" / "tuning_log.json").read_text())["args"]["calib_windows"] == "documents"
    with pytest.raises(SystemExit):
        main(["tune", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "separated (a.txt,pydoc,self)" in help_text and "A path with a comma is not supported" in help_text
    assert "never cross a document and start with BOS" in help_text


def test_the_memory_plan_counts_the_float_model_of_calib_self(tiny_model, tmp_path):
    from signround_export.tune.memory import TRANSFORMERS_IMPORT
    from signround_export.tune.signround import pick_dtype

    a = tmp_path / "a.txt"
    a.write_text(DOCS[0])
    plain = sr.tune_memory(tiny_model, nsamples=5, seqlen=32, batch_size=1, calib=str(a))
    mixed = sr.tune_memory(tiny_model, nsamples=5, seqlen=32, batch_size=1, calib=f"{a},self")
    (part,) = [p for p in mixed.parts if p.phase == "calibration"]
    assert not [p for p in plain.parts if p.phase == "calibration"]
    size = (tiny_model / "model.safetensors").stat().st_size
    item = pick_dtype(torch.device("cpu")).itemsize
    weights = 320 * 64 + 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 160 + 2 * 64) + 64
    kv = 2 * 2 * 2 * 32 * 2 * 16 * item  # k and v, 2 layers, self's 2 sequences, 32 tokens, 2 heads of 16
    assert part.nbytes == TRANSFORMERS_IMPORT + size + weights * item + kv + 2 * 2 * 320 * 4
    assert mixed.total("cpu") == mixed.parts[0].nbytes + max(part.nbytes, plain.total("cpu") - plain.parts[0].nbytes)
    with pytest.raises(DataError, match="names self more than once") as raised:
        sr.tune_memory(tiny_model, calib="self,self")
    assert raised.value.param == "calib"


def test_the_default_text_in_documents_mode_is_cut_topic_by_topic(tmp_path):
    folder = tokenizer_folder(tmp_path / "tok", bos=True)
    kept = [t for i, t in enumerate(topics[k] for k in sorted(topics)) if i % 10 != 9]
    starts = {tuple(ids[k * 63:(k + 1) * 63]) for ids in (ids_of(folder, t) for t in kept)
              for k in range(len(ids) // 63)}
    rows = calibration_ids(folder, 32, 64, 1, windows="documents")
    assert all(row[0] == 0 and tuple(row[1:]) in starts for row in rows.tolist())
    stream = calibration_ids(folder, 32, 63, 1)  # one stream: most windows start mid-topic
    assert sum(tuple(row) in starts for row in stream.tolist()) < 8


def test_pydoc_names_the_default_text_in_a_mixture(tmp_path):
    folder = tokenizer_folder(tmp_path / "tok")
    b = write_jsonl(tmp_path / "b.jsonl", DOCS[1:2] * 3)
    rows = calibration_ids(folder, 5, 16, 9, f"pydoc,{b}")
    assert torch.equal(rows[:3], calibration_ids(folder, 3, 16, 9))
    assert torch.equal(rows[3:], calibration_ids(folder, 2, 16, 9, b))
    with pytest.raises(DataError, match="pydoc more than once"):
        calibration_ids(folder, 4, 16, 9, "pydoc,pydoc")


def test_a_run_on_other_calibration_text_does_not_resume(tmp_path):
    from signround_export.errors import TuneError
    from signround_export.tune.resume import ResumeStore

    ResumeStore(tmp_path / "ckpt.progress", calibration="a.txt").begin({"bits": 4}, "gptq")
    ResumeStore(tmp_path / "ckpt.progress", calibration="a.txt").begin({"bits": 4}, "gptq")
    with pytest.raises(TuneError, match=r"different settings \(calibration\)"):
        ResumeStore(tmp_path / "ckpt.progress", calibration="pydoc_data.topics,self").begin({"bits": 4}, "gptq")


def test_the_logged_spec_reads_back_as_the_same_windows(tmp_path):
    from signround_export.data import calibration_name

    folder = tokenizer_folder(tmp_path / "tok")
    b = write_jsonl(tmp_path / "b.jsonl", DOCS[1:2] * 3)
    spec = f"pydoc,{b}"
    assert torch.equal(calibration_ids(folder, 5, 16, 9, calibration_name(spec)), calibration_ids(folder, 5, 16, 9, spec))


def test_self_without_progress_prints_nothing(tiny_model, capfd):
    self_calibration_ids(tiny_model, 2, 16, 5, progress=False)
    assert capfd.readouterr().err == ""


def test_bad_calibration_input_is_a_data_error_naming_it(tmp_path):
    folder = tokenizer_folder(tmp_path / "tok", bos=True)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": 5}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: the \"text\" field holds a int, expected a string"):
        calibration_ids(folder, 1, 16, 0, bad)
    with pytest.raises(DataError, match="`seqlen` 1 leaves no room for text after the 1 token"):
        calibration_ids(folder, 1, 1, 0, windows="documents")
    (folder / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(DataError, match="tokenizer_config.json is not valid JSON"):
        calibration_ids(folder, 1, 16, 0, windows="documents")


def test_a_path_object_is_one_file_even_with_a_comma_in_its_name(tiny_model, tmp_path):
    odd = tmp_path / "notes, part 1.txt"
    odd.write_text(" ".join(DOCS) * 4)
    sr.quantize(tiny_model, tmp_path / "c", iters=1, nsamples=4, seqlen=32, batch_size=2, calib=odd, progress=False)
    log = json.loads((tmp_path / "c" / "tuning_log.json").read_text())
    assert log["calibration"] == str(odd)
    with pytest.raises(sr.DataError, match="notes does not exist"):  # as a string spec, the comma splits it
        sr.quantize(tiny_model, tmp_path / "d", iters=1, nsamples=4, seqlen=32, batch_size=2, calib=str(odd),
                    progress=False)


def test_self_refuses_a_model_it_cannot_load_and_a_seqlen_with_no_room(tiny_model, peaked_model, tmp_path):
    import shutil

    from signround_export.errors import DataError

    with pytest.raises(DataError, match=r"`seqlen` 2 is too short .* after the 1 token") as raised:
        self_calibration_ids(peaked_model, 2, 2, 0, progress=False)  # BOS, then room for one token only
    assert raised.value.param == "seqlen"
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    for f in broken.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(DataError, match="transformers cannot load the float model .* give calibration text instead"):
        self_calibration_ids(broken, 2, 16, 0, progress=False)
