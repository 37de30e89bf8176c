"""Integration on the real default model (SmolLM2-135M-Instruct), with small settings to stay fast."""

import json

import pytest
from conftest import WIKITEXT

from signround_export.checkpoint.read import read_checkpoint
from signround_export.cli import main
from signround_export.data import encode, load_tokenizer, read_text
from signround_export.model.load import load_float_model, reference_from_checkpoint
from signround_export.validation import perplexity

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tuned(default_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "w4g128"
    assert main(["tune", str(default_model), "--out", str(out), "--bits", "4", "--group-size", "128",
                 "--iters", "8", "--nsamples", "8", "--seqlen", "128", "--batch-size", "4", "--quiet"]) == 0
    return out


def test_checkpoint_of_the_default_model(tuned):
    ckpt = read_checkpoint(tuned)
    assert len(ckpt.qweights) == 30 * 7
    down = ckpt.qweights["model.layers.0.mlp.down_proj"]
    assert down.shape == (576, 1536)
    q = ckpt.qweights["model.layers.0.self_attn.q_proj"]
    assert q.scale.shape == (576, 5)  # K=576 with groups of 128: the last group holds 64 columns
    assert ckpt.quant.bits == 4 and ckpt.quant.group_size == 128 and not ckpt.quant.sym
    log = json.loads((tuned / "tuning_log.json").read_text())
    # the best step is kept, so no block ends worse than round-to-nearest; with 8 steps most improve
    assert all(b["loss_after"] <= b["loss_before"] for b in log["blocks"])
    assert sum(b["loss_after"] < b["loss_before"] for b in log["blocks"]) >= 20
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tuned / name).is_file(), name


def test_reference_perplexity_is_sane(default_model, tuned):
    """Eight steps tune nothing worth measuring (accuracy lives in tools/bench_tune.py); this checks that
    the integers of a real model survive the checkpoint: a wrong layout would explode the perplexity
    into the thousands. W4 round-to-nearest costs this model about 25% here (4 windows: 18.5 -> 24.8);
    eight steps at lr 1/8 move the clipping far and land at 28.7 from the full range, 31.5 from
    clip_search's start."""
    model, _, folder = load_float_model(default_model)
    ids = encode(load_tokenizer(folder), read_text(WIKITEXT))
    fp = perplexity(model, ids, max_windows=4, progress=False).ppl
    q = perplexity(reference_from_checkpoint(read_checkpoint(tuned)), ids, max_windows=4, progress=False).ppl
    assert fp < q < fp * 2.5, (fp, q)
