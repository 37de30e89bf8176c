"""Data-parallel tuning (tune/parallel.py): two processes on CPU with gloo against one, on a tiny model.

Each rank is a spawned process that sets torchrun's environment and calls quantize(), so the launch
path is the one torchrun takes; the ranks report through JSON files in a temporary folder."""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from signround_export import cli, quantize
from signround_export.checkpoint.read import read_checkpoint
from signround_export.errors import SignroundError, TuneError
from signround_export.tune import signround
from signround_export.tune.config import TuneConfig
from signround_export.tune.parallel import World, joined

SETTINGS = dict(bits=4, group_size=32, iters=10, nsamples=8, seqlen=32, batch_size=4, progress=False)
TIMEOUT = 60  # seconds a test waits for its ranks


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def record_losses(losses: list) -> None:
    """Every loss a block's keeper is offered (every step's, with best "batch"), into losses."""
    offer = signround.Keeper.offer

    def offered(self, loss, it, tuner):
        losses.append(loss)
        if len(losses) == int(os.environ.get("TEST_DIE_AT_OFFER", "0")):  # this rank hangs, then dies here
            time.sleep(float(os.environ.get("TEST_HANG_SECONDS", "0")))
            os._exit(1)
        offer(self, loss, it, tuner)

    signround.Keeper.offer = offered


def float32_steps() -> None:
    """Steps in float32 even where the CPU computes bfloat16 natively (pick_dtype): in bfloat16 each
    rank's weight gradient is rounded to 8 bits before the ranks' sum, the single process's after it,
    and the signs of the small gradients differ from the first step (measured: README)."""
    signround.pick_dtype = lambda device: torch.float32


def rank_main(rank: int, size: int, port: int, model: str, out: str, report: str, settings: dict,
              env: dict, float32: bool) -> None:
    os.environ.update(dict(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(size), MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(port), SIGNROUND_DIST_TIMEOUT="20") | env.get(rank, {}))
    torch.set_num_threads(1)
    if float32:
        float32_steps()
    losses = []
    record_losses(losses)
    try:
        result = quantize(model, out, **settings)
        record = {"losses": losses, "written": result.written}
    except SignroundError as e:
        record = {"error": str(e)}
    with open(f"{report}/rank{rank}.json", "w") as f:
        json.dump(record, f)


def run_ranks(tmp_path, model, out, settings: dict, size: int = 2, env: dict | None = None,
              per_rank: dict | None = None, float32: bool = True) -> list[dict | None]:
    """quantize() on `size` spawned ranks; each rank's report (None: it wrote none) and exit code."""
    report = tmp_path / f"report-{time.monotonic_ns()}"
    report.mkdir()
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=rank_main, args=(r, size, port, str(model), str(out), str(report),
                                                 settings | (per_rank or {}).get(r, {}), env or {}, float32))
             for r in range(size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + TIMEOUT
    for p in procs:
        p.join(max(deadline - time.monotonic(), 0.1))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "a rank hung"
    reports = []
    for r, p in enumerate(procs):
        path = report / f"rank{r}.json"
        reports.append(json.loads(path.read_text()) | {"exitcode": p.exitcode} if path.is_file() else None)
    return reports


def one_process(model, out, settings: dict, float32: bool = True) -> tuple:
    """quantize() here, on one thread as each rank runs: its checkpoint, every loss offered, its log."""
    losses, threads, offer, dtype = [], torch.get_num_threads(), signround.Keeper.offer, signround.pick_dtype
    torch.set_num_threads(1)
    try:
        record_losses(losses)
        if float32:
            float32_steps()
        quantize(str(model), str(out), **settings)
    finally:
        signround.Keeper.offer, signround.pick_dtype = offer, dtype
        torch.set_num_threads(threads)
    return read_checkpoint(out), losses, json.loads((out / "tuning_log.json").read_text())


def integers(ckpt) -> dict[str, np.ndarray]:
    return {n: np.concatenate([qw.q.ravel(), qw.zero.ravel().astype(np.int64)])
            for n, qw in ckpt.qweights.items()}


def equal_fraction(a, b) -> float:
    assert a.keys() == b.keys()
    same = sum(int((a[n] == b[n]).sum()) for n in a)
    return same / sum(a[n].size for n in a)


@pytest.fixture(scope="module")
def single(tiny_model, tmp_path_factory):
    return one_process(tiny_model, tmp_path_factory.mktemp("one") / "ckpt", SETTINGS)


@pytest.fixture(scope="module")
def two(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two")
    reports = run_ranks(tmp, tiny_model, tmp / "ckpt", SETTINGS)
    return tmp / "ckpt", reports


def test_two_ranks_tune_as_one_process(single, two):
    """The same global batches, losses and gradients summed over the ranks: the single process's steps
    and integers. The losses are not bit for bit: each rank's is the mean of its slice (fewer terms, in
    another order), summed over the ranks after; so are the gradients, whose signs differ only where a
    gradient is within rounding of 0 (none here, in float32)."""
    (one, one_losses, one_log), (folder, reports) = single, two
    assert "parallel" not in one_log  # a single process's log is as it was
    ckpt = read_checkpoint(folder)
    assert [r["written"] for r in reports] == [True, False] and all(r["exitcode"] == 0 for r in reports)
    assert reports[0]["losses"] == reports[1]["losses"]  # every rank offers its keeper the same losses
    np.testing.assert_allclose(reports[0]["losses"], one_losses, rtol=1e-6)
    assert len(one_losses) == 2 * SETTINGS["iters"]
    assert equal_fraction(integers(ckpt), integers(one)) == 1.0
    log = json.loads((folder / "tuning_log.json").read_text())
    parallel = log["parallel"]
    assert (parallel["world_size"], parallel["dp_reduce"]) == (2, "sum")
    assert [b["steps"] for b in parallel["blocks"]] == [SETTINGS["iters"]] * 2
    sizes = parallel["blocks"][0]["bytes_per_step"]
    assert sizes["sum"] - 8 == 4 * (sizes["sign"] - 8) > 0


def test_adam_and_the_fixed_batch_on_two_ranks(tiny_model, tmp_path):
    """Adam steps by the gradients' values, not their signs: the ranks' sum, rounded otherwise than one
    process's, may move an integer across its rounding point (none here: measured equal); the fixed
    batch's losses are summed over the ranks too."""
    settings = SETTINGS | dict(optimizer="adam", lr=0.005, best="fixed", eval_every=3)
    one, one_losses, _ = one_process(tiny_model, tmp_path / "one", settings)
    reports = run_ranks(tmp_path, tiny_model, tmp_path / "two", settings)
    assert all(r["exitcode"] == 0 and "error" not in r for r in reports)
    assert len(one_losses) == len(reports[0]["losses"]) == 2 * 5  # steps 0, 3, 6, 9 and the end, per block
    np.testing.assert_allclose(reports[0]["losses"], one_losses, rtol=1e-6)
    assert equal_fraction(integers(read_checkpoint(tmp_path / "two")), integers(one)) >= 0.999


def test_strata_on_two_ranks_tune_as_one_process(tiny_model, tmp_path):
    """The stratified batch order gives each rank half of every batch; the steps stay the single process's."""
    settings = SETTINGS | dict(batch_order="strata")
    one, one_losses, _ = one_process(tiny_model, tmp_path / "one", settings)
    reports = run_ranks(tmp_path, tiny_model, tmp_path / "two", settings)
    assert all(r["exitcode"] == 0 and "error" not in r for r in reports)
    np.testing.assert_allclose(reports[0]["losses"], one_losses, rtol=1e-6)
    assert equal_fraction(integers(read_checkpoint(tmp_path / "two")), integers(one)) == 1.0


def test_sign_vote_runs_and_lowers_the_loss(tiny_model, tmp_path):
    reports = run_ranks(tmp_path, tiny_model, tmp_path / "ckpt", SETTINGS | {"dp_reduce": "sign"})
    assert all(r["exitcode"] == 0 and "error" not in r for r in reports)
    log = json.loads((tmp_path / "ckpt" / "tuning_log.json").read_text())
    assert log["parallel"]["dp_reduce"] == "sign"
    assert all(b["loss_after"] < b["loss_before"] for b in log["blocks"])


def test_a_dead_rank_stops_the_others_with_a_message_and_the_run_resumes(tiny_model, tmp_path, two):
    """Rank 1 dies in the middle of block 1: rank 0 stops with a message, not a hang; started again,
    the run resumes from block 0 (rank 0 wrote it) and ends with the uninterrupted run's integers."""
    out = tmp_path / "ckpt"
    start = time.monotonic()
    dead = run_ranks(tmp_path, tiny_model, out, SETTINGS, env={1: {"TEST_DIE_AT_OFFER": str(SETTINGS["iters"] + 4)}})
    assert dead[1] is None  # it died without a report
    assert "another rank stopped" in dead[0]["error"] and time.monotonic() - start < TIMEOUT
    progress = out.with_name(out.name + ".progress")
    assert (progress / "block_000.json").is_file() and not (progress / "block_001.json").is_file()
    assert not out.exists()
    with pytest.raises(TuneError, match=r"different settings \(.*world_size"):  # one process: not the same run
        quantize(str(tiny_model), str(out), **SETTINGS)
    resumed = run_ranks(tmp_path, tiny_model, out, SETTINGS)
    assert all(r["exitcode"] == 0 and "error" not in r for r in resumed)
    assert len(resumed[0]["losses"]) == SETTINGS["iters"]  # block 1 alone was tuned again
    log = json.loads((out / "tuning_log.json").read_text())
    assert log["resumed_blocks"] == 1
    assert equal_fraction(integers(read_checkpoint(out)), integers(read_checkpoint(two[0]))) == 1.0


def test_a_hung_rank_times_the_others_out(tiny_model, tmp_path):
    """Rank 1 stops answering in block 1 (alive, for longer than rank 0's timeout): rank 0 stops at its
    timeout with a message."""
    env = {0: {"SIGNROUND_DIST_TIMEOUT": "5"},
           1: {"TEST_DIE_AT_OFFER": str(SETTINGS["iters"] + 2), "TEST_HANG_SECONDS": "12"}}
    reports = run_ranks(tmp_path, tiny_model, tmp_path / "ckpt", SETTINGS, env=env)
    assert reports[1] is None
    assert "did not answer within 5 s (SIGNROUND_DIST_TIMEOUT)" in reports[0]["error"]
    assert "timed out" in reports[0]["error"].lower()


def test_ranks_that_disagree_are_told_what_differs(tiny_model, tmp_path):
    reports = run_ranks(tmp_path, tiny_model, tmp_path / "ckpt", SETTINGS, per_rank={1: {"seed": 7}})
    for r in reports:
        assert "different settings: seed (rank 0: 42, rank 1: 7)" in r["error"]
    assert not (tmp_path / "ckpt.progress").exists()


@pytest.mark.parametrize("setting,value", [("batch_size", 3), ("nsamples", 9)])
def test_a_world_size_that_does_not_divide_is_refused(setting, value):
    config = TuneConfig(**(dict(iters=4, nsamples=12, batch_size=4) | {setting: value}))
    with pytest.raises(TuneError) as e:
        World(rank=0, size=2).check(config)
    assert e.value.param == setting and f"`{setting}` {value} is not a multiple of the world size 2" in str(e.value)
    World(rank=0, size=1).check(config)


def test_the_sign_vote_needs_signsgd():
    with pytest.raises(TuneError, match="optimizer"):
        World(reduce="sign").check(TuneConfig(iters=4, nsamples=8, batch_size=4, optimizer="adam"))


def test_without_torchrun_nothing_starts(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with joined("cpu", "sign") as world:
        assert (world.rank, world.size, world.reduce, world.root) == (0, 1, "sign", True)
        assert not torch.distributed.is_initialized()
        idx = torch.tensor([5, 1, 3])
        assert torch.equal(world.local(idx, 6), idx)
        x = torch.randn(4, 2)
        assert world.share(x).data_ptr() == x.data_ptr() and world.share(x).shape == x.shape


def test_the_split_is_contiguous():
    world = World(rank=1, size=2)
    assert world.share(torch.arange(8)).tolist() == [4, 5, 6, 7]
    assert world.local(torch.tensor([6, 3, 0, 4]), 4).tolist() == [2, 0]  # samples 6 and 4, in the batch's order


def test_the_cli_refuses_a_sign_vote_with_adam_in_one_line(tiny_model, tmp_path, capsys):
    assert cli.main(["tune", str(tiny_model), "--out", str(tmp_path / "o"), "--iters", "4", "--nsamples", "4",
                     "--batch-size", "2", "--optimizer", "adam", "--dp-reduce", "sign", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("signround tune: error: --dp-reduce 'sign' votes") and "--optimizer" in err and "\n" not in err


def test_python_m_runs_the_cli():
    """torchrun launches `-m signround_export`."""
    done = subprocess.run([sys.executable, "-m", "signround_export", "tune", "--help"], capture_output=True, text=True,
                          env=os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0 and "--dp-reduce {sum,sign}" in done.stdout
