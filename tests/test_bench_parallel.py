"""tools/bench_parallel.py: the elements a step reduces, counted against a block's tuner; the uneven
shares of the single process's batches."""

import sys
from pathlib import Path

import pytest

from signround_export.checkpoint.qweight import Scheme
from signround_export.model.load import load_float_model
from signround_export.tune.signround import BlockTuner

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import bench_parallel as bp  # noqa: E402


@pytest.mark.parametrize("group", [32, 48])  # 48 leaves a short last group on the 64-wide inputs
def test_the_elements_a_step_reduces_are_the_tuners_variables(tiny_model, group):
    model = load_float_model(tiny_model)[0]
    schemes = {n: Scheme(4, group, False) for n in model.cfg.family.linears}
    tuner = BlockTuner(model.block_params(0), schemes, "cpu")
    assert bp.tuned_elements(model.cfg, group) == sum(t.numel() for t in tuner.variables())


def test_the_busiest_rank_holds_more_than_an_even_share():
    assert bp.busiest_share(128, 8, 1, steps=50) == 1.0
    two, eight = bp.busiest_share(128, 8, 2, steps=500), bp.busiest_share(128, 8, 8, steps=500)
    assert 1.1 < two < 1.5 and two < eight <= 8
    assert bp.busiest_share(16, 8, 2, steps=50) >= 1.0


def test_strata_give_every_rank_an_even_share():
    assert all(bp.busiest_share(128, 8, n, steps=100, order="strata") == 1.0 for n in (2, 4, 8))
