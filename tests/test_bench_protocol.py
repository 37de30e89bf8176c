"""tools/bench_protocol.py's pieces that need no tuning: arms from the command line, the order of the
cells, the reuse of finished cells, and the table's arithmetic."""

import json
import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import bench_protocol as bp  # noqa: E402

MODEL = Path("model-folder")  # only parsed, never read


def test_an_arm_from_the_command_line_adds_tune_flags_or_autoround_keywords():
    name, arm = bp.parse_arm("rtn-clip=rtn:--clip-search", bp.ARMS)
    assert name == "rtn-clip" and arm == bp.Arm("signround", ("--iters", "0", "--no-clip-search", "--clip-search"))
    assert bp.uses_seed(MODEL, bp.Protocol(), arm) and not bp.uses_seed(MODEL, bp.Protocol(), bp.ARMS["rtn"])
    name, arm = bp.parse_arm("ar-lr=ar:lr=0.002 iters=400 scale_dtype=bf16 --nsamples 64", bp.ARMS)
    assert arm.ar_kwargs == {"lr": 0.002, "iters": 400, "scale_dtype": "bf16"}
    assert arm.tune_args == ("--nsamples", "64")
    assert bp.tune_settings(MODEL, bp.Protocol(), arm, 43).nsamples == 64


def test_ranks_run_an_arm_under_torchrun_and_count_in_its_settings(tiny_model, tmp_path):
    name, arm = bp.parse_arm("dp2=ours:--ranks 2 --dp-reduce sign", bp.ARMS)
    assert arm == bp.Arm("signround", ("--dp-reduce", "sign"), ranks=2)
    protocol = bp.Protocol(group_size=32, iters=2, nsamples=4, seqlen=16, batch_size=2)
    r = bp.Run(tiny_model, tmp_path, protocol, 40, "python", "off", "on", "auto", False)
    plain = bp.Cell("ours", bp.ARMS["ours"], 42)
    assert "ranks" not in r.settings(plain)  # cells made before ranks existed keep their settings
    assert r.settings(bp.Cell(name, arm, 42))["ranks"] == 2
    facts = bp.tune_ours(r, bp.Cell(name, arm, 42), tmp_path / "ckpt")
    assert "torch.distributed.run" in facts["command"] and "--dp-reduce sign" in facts["command"]
    log = json.loads((tmp_path / "ckpt" / "tuning_log.json").read_text())
    assert (log["parallel"]["world_size"], log["parallel"]["dp_reduce"]) == (2, "sign")


@pytest.mark.parametrize("spec, said", [("x=nope", "BASE one of"), ("x=ar:lr", "not an AutoRound keyword"),
                                        ("x=ar:--iters 400", "would not reach auto-round"),
                                        ("x=float:--iters 3", "takes no arguments"),
                                        ("x=ours:--ranks", "--ranks takes a number")])
def test_a_bad_arm_is_refused_by_name(spec, said):
    with pytest.raises(SystemExit, match=said):
        bp.parse_arm(spec, bp.ARMS)


def test_cells_run_seed_major_with_the_arms_rotating_and_seedless_arms_once():
    cells = bp.matrix(bp.ARMS, [42, 43, 44], MODEL, bp.Protocol())
    assert [c.name for c in cells] == ["float", "rtn", "ours-s42", "ar-s42", "ours-noclip-s42",
                                       "ar-s43", "ours-noclip-s43", "ours-s43",
                                       "ours-noclip-s44", "ours-s44", "ar-s44"]


def record(arm, tool, seed, wikitext, pydoc, seconds):
    return {"arm": arm, "tool": tool, "seed": seed, "ppl": {"wikitext": wikitext, "pydoc": pydoc},
            "tune_seconds": seconds, "settings": {"protocol": {"bits": 4} if tool != "float" else None,
                                                  "tune_args": [], "ar_kwargs": {}},
            "eval": {d: {"text": d, "protocol": "p"} for d in bp.DOMAINS}, "machine": "m", "commit": "c",
            "date": "d", "protocol_command": "cmd"}


def test_the_table_gives_the_share_of_rtns_gap_closed_and_the_time_against_autoround():
    records = [record("float", "float", None, 10.0, 5.0, None), record("rtn", "signround", None, 12.0, 6.0, 10.0),
               record("ours", "signround", 42, 11.0, 5.5, 80.0), record("ours", "signround", 43, 11.2, 5.5, 80.0),
               record("ar", "autoround", 42, 11.5, 5.25, 100.0)]
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in bp.table(records).splitlines()
            if line.startswith("| ") and "---" not in line}
    assert rows["ours"][2] == "2" and rows["ours"][3].startswith("11.100 ± 0.141 (11.000..11.200)")
    assert rows["ours"][5:7] == ["45.0%", "50.0%"] and rows["ar"][5:7] == ["25.0%", "75.0%"]
    assert rows["ours"][9] == "0.80x |" and rows["float"][5] == "100.0%" and rows["rtn"][6] == "0.0%"


def test_cells_that_shared_the_machine_are_named_under_the_table(monkeypatch):
    cores = os.cpu_count()
    alone = record("ours", "signround", 42, 11.0, 5.5, 80.0) | {"cell": "ours-s42",
                                                                "load_average": {"mean": cores + 0.2, "max": 3.0}}
    busy = record("ar", "autoround", 42, 11.5, 5.25, 100.0) | {"cell": "ar-s42",
                                                               "load_average": {"mean": cores + 2.0, "max": 6.0}}
    old = record("ar", "autoround", 43, 11.5, 5.25, 100.0) | {"cell": "ar-s43"}  # made before loads were kept
    other = record("ours", "signround", 43, 11.0, 5.5, 80.0) | {"cell": "ours-s43",  # on a 16-core machine
                                                                "load_average": {"mean": 9.0, "max": 9.0, "cores": 16}}
    text = bp.table([alone, busy, old, other])
    assert f"so their times do not compare: ar-s42 ({cores + 2.0:.1f})" in text and "ours-s42 (" not in text
    assert "ours-s43 (" not in text


def test_the_load_is_sampled_while_a_cell_tunes():
    with bp.load_sampled(every=0.01) as samples:
        time.sleep(0.2)
    assert samples and all(s >= 0 for s in samples)


def test_a_finished_cell_is_skipped_and_one_made_otherwise_stops_the_run(tmp_path):
    r = bp.Run(MODEL, tmp_path, bp.Protocol(), 40, "python", "off", "on", "auto", False)
    cells = bp.matrix({"float": bp.ARMS["float"], "ours": bp.ARMS["ours"]}, [42], MODEL, bp.Protocol())
    (tmp_path / "cells").mkdir()
    bp.write_json(tmp_path / "cells" / "float.json", {"settings": r.settings(cells[0])})
    assert bp.pending(r, cells) == cells[1:]
    bp.write_json(tmp_path / "cells" / "ours-s42.json", {"settings": r.settings(cells[1]) | {"eval_windows": 8}})
    with pytest.raises(SystemExit, match="ours-s42.json was made with other settings"):
        bp.pending(r, cells)


def test_autoround_packs_in_its_gptq_layout_only_where_its_awq_packing_cannot_hold_the_scheme(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 576, "intermediate_size": 1536,
                                                      "num_attention_heads": 9}))
    assert bp.autoround_packing(tmp_path, bp.Protocol(group_size=128)) == "gptq"
    assert bp.autoround_packing(tmp_path, bp.Protocol(group_size=64)) == "auto"
    assert bp.autoround_packing(tmp_path, bp.Protocol(group_size=128, sym=True)) == "auto"
    assert bp.autoround_packing(tmp_path, bp.Protocol(group_size=128, bits=3)) == "auto"


def test_the_windows_our_tune_logged_are_checked_against_the_saved_ones(tiny_model, tmp_path):
    from signround_export import quantize

    protocol = bp.Protocol(group_size=32, iters=1, nsamples=2, seqlen=16, batch_size=2)
    ns = bp.tune_settings(tiny_model, protocol, bp.ARMS["ours"], 43)
    quantize(tiny_model, tmp_path / "ckpt", group_size=32, iters=1, nsamples=2, seqlen=16, batch_size=2, seed=43,
             progress=False)
    bp.check_windows(tmp_path / "ckpt", tiny_model, ns, bp.calibration(tiny_model, ns))
    other = bp.tune_settings(tiny_model, protocol, bp.ARMS["ours"], 44)
    with pytest.raises(SystemExit, match="windows differ"):
        bp.check_windows(tmp_path / "ckpt", tiny_model, ns, bp.calibration(tiny_model, other))
