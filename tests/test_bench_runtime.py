"""tools/bench_runtime.py: the bytes one decoded token reads, counted by hand on a tiny model; the
candidate files' bytes against real exports; the roofline arithmetic; the table; the refusals; and
one run of the harness on a tiny model in both engines."""

import json
import sys
from pathlib import Path

import pytest

from conftest import TOKENIZER_TEXT, rtn_checkpoint, write_tiny_model
from signround_export.checkpoint.read import read_checkpoint
from signround_export.export.gguf import export_gguf
from signround_export.export.onnx import export_onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import bench_runtime as br  # noqa: E402

try:
    import llama_cpp
except ImportError:
    llama_cpp = None

# the tiny model of conftest.write_tiny_model: hidden 64, intermediate 160, 2 layers, 4 heads of 16, 2 kv heads,
# vocabulary 320, context 512
LINEAR_ROWS = {"q": (64, 64), "k": (32, 64), "v": (32, 64), "o": (64, 64), "gate": (160, 64), "up": (160, 64),
               "down": (64, 160)}  # [N, K]
NORMS = 4 * 64 * (2 * 2 + 1)  # float32, two per layer and the final one
SHAPE_CONSTANTS = 200  # the graph's small int64 initializers (axes, shapes, split sizes), 8 to 32 bytes each


def per_32(bytes_per_block: int) -> int:
    """Bytes of the tiny model's linears at bytes_per_block per 32 weights."""
    return 2 * sum(n * (k // 32) * bytes_per_block for n, k in LINEAR_ROWS.values())


@pytest.fixture(scope="module")
def tiny_w4(tiny_model, tmp_path_factory):
    return rtn_checkpoint(tiny_model, tmp_path_factory.mktemp("bench-runtime") / "w4g32s", bits=4, group_size=32,
                          sym=True)


@pytest.fixture(scope="module")
def tiny_files(tiny_w4, tmp_path_factory):
    """The tiny W4G32 sym checkpoint as our ONNX folder (8-bit head) and as Q4_0 with a Q8_0 embedding."""
    out = tmp_path_factory.mktemp("bench-runtime-files")
    ckpt = read_checkpoint(tiny_w4)
    export_onnx(ckpt, out / "onnx", lm_head_bits=8)
    export_gguf(ckpt, out / "q4_0.gguf", float_type="Q8_0", tokenizer_pre_name="gpt-2")
    return out / "onnx", out / "q4_0.gguf"


def test_a_decoded_token_reads_every_matrix_once_and_one_row_of_each_table(tiny_files):
    onnx_dir, gguf_path = tiny_files
    ours = br.onnx_file(onnx_dir)
    # W4 block 32 sym: 16 bytes of codes + a float32 scale per 32; the tied 8-bit head (32 + 4 per 32) is read
    # whole and the embedding gathers its rows (no second matrix); cos and sin: one row of 8 float32 each
    hand = per_32(20) + 320 * 2 * 36 + NORMS + 2 * 8 * 4
    assert 0 <= ours.weights_per_token - hand < SHAPE_CONSTANTS
    assert ours.weight_bytes - ours.weights_per_token == 2 * (512 - 1) * 8 * 4  # the rest of the RoPE tables
    assert ours.kv_per_position == 2 * 2 * 2 * 16 * 4  # k and v, 2 layers, 2 kv heads of 16, float32
    theirs = br.gguf_file(gguf_path)
    # Q4_0: 18 bytes per 32; the tied Q8_0 embedding (34 per 32) is the head, read whole; no other table
    assert theirs.weights_per_token == theirs.weight_bytes == per_32(18) + 320 * 2 * 34 + NORMS
    assert theirs.kv_per_position == 2 * 2 * 2 * 16 * 2  # float16
    assert (ours.vocab_size, theirs.vocab_size, ours.context_length, theirs.context_length) == (320, 320, 512, 512)


def test_an_embedding_beside_its_own_head_is_one_row_a_tied_head_the_whole_matrix(tmp_path):
    for tied in (True, False):
        model = write_tiny_model(tmp_path / f"tied-{tied}", tied=tied)
        ckpt = read_checkpoint(rtn_checkpoint(model, tmp_path / f"ckpt-{tied}", bits=4, group_size=32, sym=True))
        export_onnx(ckpt, tmp_path / f"onnx-{tied}", lm_head_bits=16)
        got = br.onnx_file(tmp_path / f"onnx-{tied}").weights_per_token
        matrix = 320 * 64 * 4
        hand = per_32(20) + NORMS + 2 * 8 * 4 + (matrix if tied else matrix + 64 * 4)
        assert 0 <= got - hand < SHAPE_CONSTANTS, (tied, got - hand)
        export_gguf(ckpt, tmp_path / f"{tied}.gguf", float_type="Q8_0", tokenizer_pre_name="gpt-2")
        theirs = br.gguf_file(tmp_path / f"{tied}.gguf")
        embedding = 320 * 2 * 34  # Q8_0; a row of 64 is 2 * 34 bytes
        assert theirs.weight_bytes - theirs.weights_per_token == (0 if tied else embedding - 2 * 34)


def test_candidate_bytes_are_those_of_the_exported_files(tiny_model, tiny_w4, tiny_files, tmp_path):
    shape = br.Shape.from_config(json.loads((tiny_model / "config.json").read_text()))
    onnx_dir, gguf_path = tiny_files
    rope = 2 * 512 * 8 * 4
    ours = br.onnx_file(onnx_dir).weight_bytes - rope
    assert 0 <= ours - br.onnx_candidate_bytes(shape, 4, 32, True, 32, 8) < SHAPE_CONSTANTS
    assert br.gguf_file(gguf_path).weight_bytes == br.gguf_candidate_bytes(shape, "Q4_0")
    asym = read_checkpoint(rtn_checkpoint(tiny_model, tmp_path / "w4g64a", bits=4, group_size=64, sym=False))
    export_onnx(asym, tmp_path / "asym", lm_head_bits=4, max_block=64)
    got = br.onnx_file(tmp_path / "asym").weight_bytes - rope
    assert 0 <= got - br.onnx_candidate_bytes(shape, 4, 64, False, 64, 4) < SHAPE_CONSTANTS
    assert br.onnx_candidate_bytes(shape, 4, 64, False, 64, 4) != br.onnx_candidate_bytes(shape, 4, 64, False, 32, 4)


def test_smollm2_sizes_match_llama_quantize_files():
    """SmolLM2-135M's config: Q4_0 and Q4_K_M as llama-quantize wrote them (docs/benchmarks.md: 87.5 and
    100.6 MiB) hold the same metadata (1.81 MB of vocabulary) beside the tensors computed here."""
    shape = br.Shape(576, 1536, 30, 9, 3, 64, 49152, True)
    q4_0, q4_k_m = br.gguf_candidate_bytes(shape, "Q4_0"), br.gguf_candidate_bytes(shape, "Q4_K_M")
    assert q4_0 == 106168320 * 18 // 32 + 28311552 * 34 // 32 + 4 * 576 * 61
    assert abs((87.5 * 2**20 - q4_0) - (100.6 * 2**20 - q4_k_m)) < 0.06 * 2**20  # MiB rounding
    assert br.onnx_candidate_bytes(shape, 4, 64, True, 64, 8) / q4_0 == pytest.approx(1.02, abs=0.005)


def test_decode_bytes_average_the_positions_each_step_attends():
    # prompt 4, 3 steps: they attend to 5, 6 and 7 positions
    assert br.decode_bytes_per_token(1000, 10, prompt=4, new=3) == 1000 + 10 * (5 + 6 + 7) / 3
    assert br.roofline(2.0, 1e6) == 2000.0
    assert br.Stored("t", 800, rows=100).read_per_token == 8 and br.Stored("m", 800).read_per_token == 800


def test_rounds_flip_the_engine_order():
    cells = [br.Cell(32, 1), br.Cell(256, 2)]
    order = [(r, c.prompt, e) for r, c, e in br.schedule(cells, 2)]
    assert order == [(0, 32, "llama.cpp"), (0, 32, "ours"), (0, 256, "llama.cpp"), (0, 256, "ours"),
                     (1, 32, "ours"), (1, 32, "llama.cpp"), (1, 256, "ours"), (1, 256, "llama.cpp")]


def fake_file(engine, weights):
    return br.EngineFile(engine, engine, 0, weights, weights, 0, 2048, 320)


def test_the_summary_gives_medians_spreads_ratios_and_each_engines_roofline():
    runs = [{"engine": e, "prompt": 32, "threads": 1, "prefill_tps": p, "decode_tps": d, "tokens": t}
            for e, p, d, t in [("llama.cpp", 100, 50, [1, 2, 3]), ("llama.cpp", 120, 40, [1, 2, 3]),
                               ("llama.cpp", 110, 60, [1, 2, 3]), ("ours", 150, 45, [1, 2, 4]),
                               ("ours", 165, 30, [1, 2, 4]), ("ours", 90, 55, [1, 2, 4])]]
    files = {"llama.cpp": fake_file("llama.cpp", 10**8), "ours": fake_file("ours", 2 * 10**8)}
    row, = br.summarize(runs, files, new=128, bandwidth=20.0)
    assert row["llama.cpp"]["prefill_tps"] == {"median": 110, "min": 100, "max": 120}
    assert row["prefill_ratio"] == 150 / 110 and row["decode_ratio"] == 45 / 50
    assert row["ours"]["roofline_tps"] == 100.0 and row["llama.cpp"]["of_roofline"] == 50 / 200
    assert row["greedy_tokens_alike"] == 2
    lines = br.table([row]).splitlines()
    assert lines[2] == ("| 32 | 1 | 110.0 (100.0..120.0) | 150.0 (90.0..165.0) | 1.36x | 50.0 (40.0..60.0) | "
                        "45.0 (30.0..55.0) | 0.90x | 25% | 45% |")
    assert lines[0].count("|") == lines[1].count("|") == lines[2].count("|")


@pytest.mark.parametrize("text, said", [("32,x", "integers separated by commas"), ("32,0", "at least 1")])
def test_bad_lists_are_refused_by_name(text, said):
    with pytest.raises(Exception, match=said):
        br.int_list(text)


def test_what_would_overrun_a_cache_or_mix_two_models_is_refused():
    files = {"llama.cpp": fake_file("llama.cpp", 1), "ours": fake_file("ours", 1)}
    args = br.parser().parse_args(["--prompts", "1024,2000", "--new", "128"])
    with pytest.raises(SystemExit, match="exceeds .* context length 2048"):
        br.check(args, files)
    args = br.parser().parse_args([])
    br.check(args, files)
    files["ours"] = br.EngineFile("ours", "ours", 0, 1, 1, 0, 2048, 321)
    with pytest.raises(SystemExit, match="vocabularies of 321 and 320"):
        br.check(args, files)
    with pytest.raises(SystemExit, match="give --onnx FOLDER and --gguf FILE"):
        br.main([])


@pytest.mark.skipif(llama_cpp is None, reason="llama-cpp-python is not installed (make setup builds it)")
def test_the_harness_runs_both_engines_on_a_tiny_model(tiny_files, tmp_path, capsys):
    onnx_dir, gguf_path = tiny_files
    text = tmp_path / "text.txt"
    text.write_text(TOKENIZER_TEXT * 10)
    out = tmp_path / "bench.json"
    br.main(["--onnx", str(onnx_dir), "--gguf", str(gguf_path), "--prompts", "8,24", "--threads", "1", "--new", "6",
             "--rounds", "2", "--text", str(text), "--bandwidth", "10", "--json", str(out)])
    record = json.loads(out.read_text())
    assert [(r["round"], r["prompt"], r["engine"]) for r in record["runs"]] == [
        (0, 8, "llama.cpp"), (0, 8, "ours"), (0, 24, "llama.cpp"), (0, 24, "ours"),
        (1, 8, "ours"), (1, 8, "llama.cpp"), (1, 24, "ours"), (1, 24, "llama.cpp")]
    assert all(len(r["tokens"]) == 6 and r["decode_tps"] > 0 and r["prefill_tps"] > 0 for r in record["runs"])
    assert [c["prompt"] for c in record["cells"]] == [8, 24]
    table = capsys.readouterr().out
    assert "| 24 | 1 |" in table and record["table"] in table


def test_ab_alternates_two_folders_and_sees_the_same_tokens(tiny_files):
    import bench_ab

    folder = tiny_files[0]
    ids = list(range(10, 42))
    runs = bench_ab.rounds({"A": folder, "B": folder}, ids, 6, 1, 3)
    assert [len(v) for v in runs.values()] == [3, 3]
    assert all(r["tokens"] == runs["A"][0]["tokens"] and len(r["tokens"]) == 6 for v in runs.values() for r in v)
    assert all(r["prefill_s"] > 0 and r["decode_s"] > 0 for v in runs.values() for r in v)
