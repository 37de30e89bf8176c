"""The runtime: generation through onnxruntime equals the PyTorch reference, batches, sampling, stop
tokens, streaming, the CLI, and no torch anywhere in its imports."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from signround_runtime import Model, RuntimeModelError, Sampling
from signround_runtime.cli import main as run_main
from signround_runtime.manifest import write_manifest
from signround_runtime.sampling import choose, penalize

from conftest import reference_greedy, rtn_checkpoint
from signround_export.checkpoint.read import read_checkpoint
from signround_export.export.onnx.build import export_onnx
from signround_export.model.load import reference_from_checkpoint


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    base = tmp_path_factory.mktemp("runtime")
    ckpt = read_checkpoint(rtn_checkpoint(tiny_model, base / "ckpt", bits=4, group_size=32))
    export_onnx(ckpt, base / "onnx", accuracy_level=0)
    return base / "onnx", reference_from_checkpoint(ckpt)


def test_greedy_equals_the_reference(exported):
    folder, ref = exported
    model = Model(folder, threads=2)
    prompt = [5, 17, 42, 99, 3, 250]
    g = model.generate([prompt], max_new_tokens=32, stop_ids=set())
    assert g.tokens[0] == reference_greedy(ref, prompt, 32)
    assert g.finish == ["length"] and g.decode_steps == 31 and g.decode_tokens_per_second > 0


def test_a_batch_of_different_lengths_equals_single_runs(exported):
    model = Model(exported[0], threads=2)
    prompts = [[5, 17, 42], [7, 8, 9, 10, 11, 12, 13, 14, 15], [200]]
    batch = model.generate(prompts, max_new_tokens=12, stop_ids=set())
    for p, got in zip(prompts, batch.tokens):
        assert got == model.generate([p], max_new_tokens=12, stop_ids=set()).tokens[0]


def test_stop_tokens_end_one_sequence(exported):
    model = Model(exported[0], threads=2)
    free = model.generate([[5, 17, 42]], max_new_tokens=10, stop_ids=set()).tokens[0]
    stop = free[4]
    g = model.generate([[5, 17, 42], [9, 9]], max_new_tokens=10, stop_ids={stop})
    assert g.tokens[0] == free[: free.index(stop)] and g.finish[0] == "stop"


def test_sampling_is_seeded_and_limits_work(exported):
    model = Model(exported[0], threads=2)
    s = Sampling(temperature=1.0, top_k=20, top_p=0.9, seed=7)
    a = model.generate([[5, 6]], 16, s, stop_ids=set()).tokens[0]
    assert a == model.generate([[5, 6]], 16, Sampling(1.0, 20, 0.9, seed=7), stop_ids=set()).tokens[0]
    greedy = model.generate([[5, 6]], 16, stop_ids=set()).tokens[0]
    assert model.generate([[5, 6]], 16, Sampling(temperature=2.0, top_k=1, seed=1), stop_ids=set()).tokens[0] == greedy
    rng = np.random.default_rng(0)
    logits = np.array([1.0, 3.0, 2.9, -1.0])
    assert {choose(logits, Sampling(1.0, top_p=0.01), rng, np.array([])) for _ in range(20)} == {1}
    assert set(choose(logits, Sampling(1.0, top_k=2), rng, np.array([])) for _ in range(200)) == {1, 2}
    np.testing.assert_allclose(penalize(logits, np.array([1, 3]), 2.0), [1.0, 1.5, 2.9, -2.0])
    with pytest.raises(ValueError, match="top_p"):
        model.generate([[5]], 4, Sampling(top_p=0))


def test_stream_yields_the_decoded_reply(exported):
    model = Model(exported[0], threads=2)
    text = "".join(model.stream([5, 17, 42], 20))
    assert text == model.decode(model.last_generation.tokens[0])


def test_bad_requests_are_clear(exported, tmp_path, capsys):
    model = Model(exported[0], threads=2)
    with pytest.raises(RuntimeModelError, match="at least one token"):
        model.generate([[]])
    with pytest.raises(RuntimeModelError, match="token ids must lie"):
        model.generate([[10**6]])
    with pytest.raises(RuntimeModelError, match="context length"):
        model.generate([[1] * 10], max_new_tokens=10**6)
    assert run_main([str(tmp_path), "hi"]) == 2
    assert "has no model.onnx" in capsys.readouterr().err


def test_a_graph_without_a_fixed_vocabulary_is_refused(exported, tmp_path):
    """The runtime sizes its logits buffer from the graph's logits output."""
    import shutil

    import onnx

    folder = tmp_path / "symbolic-vocab"
    shutil.copytree(exported[0], folder)
    model = onnx.load(str(folder / "model.onnx"))
    logits = next(o for o in model.graph.output if o.name == "logits")
    logits.type.tensor_type.shape.dim[-1].dim_param = "vocab_size"
    onnx.save(model, str(folder / "model.onnx"))
    write_manifest(folder)  # the folder as edited here
    with pytest.raises(RuntimeModelError, match="no logits output of a fixed vocabulary size"):
        Model(folder, threads=1)


def test_cli_prints_a_reply_and_speed(exported, capfd):
    assert run_main([str(exported[0]), "hello", "--raw", "--max-new-tokens", "5", "--threads", "1"]) == 0
    err = capfd.readouterr().err
    assert "tok/s" in err


def test_runtime_never_imports_torch(exported):
    code = f"""
import sys
from signround_runtime import Model
m = Model({str(exported[0])!r}, threads=1)
m.generate([[5, 6, 7]], 4)
"".join(m.stream([5, 6], 3))
bad = [n for n in ("torch", "transformers", "signround_export") if n in sys.modules]
assert not bad, bad
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr


def test_onnxruntime_genai_runs_the_folder_like_the_runtime(exported):
    """onnxruntime-genai, the independent consumer of the folder, makes the same greedy tokens."""
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")
    folder, _ = exported
    prompt = [5, 17, 42, 99, 3]
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + 16, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    theirs = []
    while not gen.is_done():
        gen.generate_next_token()
        theirs.append(int(gen.get_next_tokens()[0]))
    ours = Model(folder, threads=2).generate([prompt], 16, stop_ids=set()).tokens[0]
    assert theirs == ours[: len(theirs)] and len(theirs) >= 8


def test_a_batch_takes_per_prompt_limits_and_seeds(exported):
    model = Model(exported[0], threads=2)
    prompts = [[5, 17, 42], [7, 8, 9, 10]]
    s = [Sampling(temperature=1.0, seed=3), Sampling(temperature=0.8, top_k=10, seed=11)]
    batch = model.generate(prompts, [6, 11], s, stop_ids=set())
    assert [len(t) for t in batch.tokens] == [6, 11] and batch.finish == ["length", "length"]
    for p, n, one, got in zip(prompts, [6, 11], s, batch.tokens):
        assert got == model.generate([p], n, one, stop_ids=set()).tokens[0]  # same seed, same tokens, batched or not
    ended = model.generate(prompts, 10, stop_ids=set(), on_step=lambda toks: [0])  # on_step ends prompt 0 at once
    assert len(ended.tokens[0]) == 1 and ended.finish[0] == "stop" and len(ended.tokens[1]) == 10


def test_sampling_near_zero_temperature_or_penalty_is_greedy_not_nan():
    """Logits that overflow when scaled (temperature or repetition penalty near 0) give the limit,
    the greedy token, never NaN probabilities that fail the whole batch."""
    rng, logits = np.random.default_rng(0), np.array([1.0, 3.0, 2.0, -1.0])
    assert choose(logits, Sampling(temperature=5e-324), rng, np.array([], dtype=int)) == 1
    assert choose(-np.abs(logits), Sampling(temperature=5e-324), rng, np.array([], dtype=int)) == 0
    assert choose(logits, Sampling(1.0, repetition_penalty=5e-324), rng, np.array([2])) == 2
