"""What a tuning run is asked to do: TuneConfig, and the named recipes that fill it in."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..checkpoint.qweight import SUPPORTED_BITS, UNIFORM, Scheme, check_grid
from ..data import CALIB_WINDOWS
from ..errors import TuneError

# Named settings; explicit values override them. "best" is the full default recipe.
RECIPES = {
    "best": dict(iters=200, nsamples=128, seqlen=512, batch_size=8),
    "fast": dict(iters=50, nsamples=64, seqlen=256, batch_size=4),
}
ACT_DTYPES = ("float32", "bfloat16")  # how calibration activations may be stored
# The tuning choices that can be switched one at a time to measure each (the first of each is the default)
OPTIMIZERS = ("signsgd", "adam")
LR_SCHEDULES = ("linear", "constant", "cosine")
BEST_RULES = ("batch", "last", "fixed")
BATCH_ORDERS = ("random", "strata")
# the fields of the switches that measure SignRound's choices one at a time (tune's "ablation" flags)
ABLATION_SETTINGS = ("optimizer", "tune_clip", "lr_schedule", "patience", "best", "eval_every", "batch_order")
# settings added later than the resume store: at their defaults a run tunes as before they existed
LATER_SETTINGS = (*ABLATION_SETTINGS, "grid")


@dataclass
class TuneConfig:
    bits: int = 4
    group_size: int = 128  # -1: one group per row
    sym: bool = False
    grid: str = UNIFORM  # or a non-uniform grid of checkpoint.qweight.GRIDS (set by `tune --gguf iq4_nl`)
    iters: int = 200
    nsamples: int = 128
    seqlen: int = 512
    batch_size: int = 8
    lr: float | None = None  # None: 1 / iters
    seed: int = 42
    quant_lm_head: bool = False
    # start the clipping at the input-weighted best factor (clip_search); None: when iters > 0. With
    # iters 0 and clip_search True, the search's start is the result (no SignRound steps).
    clip_search: bool | None = None
    layer_schemes: dict[str, Scheme] = field(default_factory=dict)  # layer name -> scheme, where not the above
    # how the calibration activations (three chains of nsamples x seqlen x hidden) are stored: float32, or
    # bfloat16 for half their memory (it rounds every block's inputs and targets, so the integers change)
    act_dtype: str = "float32"
    # how the calibration windows are cut (data.calibration_ids): "stream" (each source one stream of
    # tokens) or "documents" (inside single documents, led by BOS where the tokenizer adds one)
    calib_windows: str = "stream"
    # Ablation switches, for measuring each tuning choice on its own; the defaults are SignRound as published.
    optimizer: str = "signsgd"  # or "adam" on the same variables, schedule and bounds
    tune_clip: bool = True  # False: only the rounding offsets move; the clipping stays at its start
    lr_schedule: str = "linear"  # lr decays linearly to 0; "constant"; "cosine" (half a period to 0)
    # stop a block this many steps after the lowest loss the rule below measures (the steps' batch losses,
    # or with "fixed" the fixed batch's, measured every eval_every steps); 0: run every step
    patience: int = 0
    # which parameters a block keeps: "batch" those of the lowest loss on the step's own batch; "last" the
    # final ones; "fixed" those of the lowest loss on one fixed batch, measured every eval_every steps
    best: str = "batch"
    eval_every: int = 10
    # how a block's steps draw their batches from the samples (signround.batch_order): "random" batches of
    # a random permutation (SignRound's); "strata" one sample from each of batch_size contiguous strata,
    # which splits every batch evenly over data-parallel ranks (parallel.py)
    batch_order: str = "random"

    @classmethod
    def from_recipe(cls, recipe: str = "best", **settings) -> "TuneConfig":
        """The recipe's iters, nsamples, seqlen and batch_size, then every setting that is not None."""
        if recipe not in RECIPES:
            raise TuneError(f"`recipe` {recipe!r}: choose one of {', '.join(RECIPES)}", param="recipe")
        given = {k: v for k, v in settings.items() if v is not None}
        config = cls(**(RECIPES[recipe] | given))
        config.check()
        return config

    def check(self) -> None:
        """Refuse settings no run can use, naming the parameter."""
        if self.bits not in SUPPORTED_BITS:
            raise TuneError(f"`bits` {self.bits}: choose one of {', '.join(map(str, SUPPORTED_BITS))}", param="bits")
        if self.group_size != -1 and self.group_size <= 0:
            raise TuneError(f"`group_size` {self.group_size}: give a positive group size, or -1 for one group "
                            "per row", param="group_size")
        check_grid(self.grid, self.bits, self.sym, name="tuning settings")
        if self.iters < 0:
            raise TuneError(f"`iters` {self.iters}: give 0 (round to nearest) or more steps", param="iters")
        for name in ("nsamples", "seqlen", "batch_size"):
            if getattr(self, name) <= 0:
                raise TuneError(f"`{name}` {getattr(self, name)}: give a positive number", param=name)
        if self.lr is not None and self.lr <= 0:
            raise TuneError(f"`lr` {self.lr}: give a positive learning rate, or None for 1 / iters", param="lr")
        if self.act_dtype not in ACT_DTYPES:
            raise TuneError(f"`act_dtype` {self.act_dtype!r}: choose one of {', '.join(ACT_DTYPES)}", param="act_dtype")
        if self.calib_windows not in CALIB_WINDOWS:
            raise TuneError(f"`calib_windows` {self.calib_windows!r}: choose one of {', '.join(CALIB_WINDOWS)}",
                            param="calib_windows")
        self.check_ablation()
        if self.uses_data() and self.batch_size > self.nsamples:
            raise TuneError(f"`batch_size` {self.batch_size} is larger than `nsamples` {self.nsamples}; lower "
                            "the first or raise the second", param="batch_size")
        if self.iters > 0 and self.batch_order == "strata" and self.nsamples % self.batch_size:
            raise TuneError(f"`batch_order` 'strata' cuts the {self.nsamples} samples into `batch_size` "
                            f"{self.batch_size} equal strata: give an nsamples that is a multiple of batch_size",
                            param="batch_order")

    def check_ablation(self) -> None:
        for name, choices in (("optimizer", OPTIMIZERS), ("lr_schedule", LR_SCHEDULES), ("best", BEST_RULES),
                              ("batch_order", BATCH_ORDERS)):
            if getattr(self, name) not in choices:
                raise TuneError(f"`{name}` {getattr(self, name)!r}: choose one of {', '.join(choices)} (default "
                                f"{choices[0]})", param=name)
        if not isinstance(self.tune_clip, bool):
            raise TuneError(f"`tune_clip` {self.tune_clip!r}: give True (tune the clipping factors) or False",
                            param="tune_clip")
        if not isinstance(self.patience, int) or self.patience < 0:
            raise TuneError(f"`patience` {self.patience!r}: give the steps without improvement after which a block "
                            "stops, or 0 to run every step", param="patience")
        if not isinstance(self.eval_every, int) or self.eval_every <= 0:
            raise TuneError(f"`eval_every` {self.eval_every!r}: give a positive number of steps between "
                            "measurements on the fixed batch", param="eval_every")

    def scheme(self, layer: str | None = None) -> Scheme:
        return self.layer_schemes.get(layer) or Scheme(self.bits, self.group_size, self.sym, grid=self.grid)

    def searches(self) -> bool:
        return self.clip_search if self.clip_search is not None else self.iters > 0

    def uses_data(self) -> bool:
        return self.iters > 0 or self.searches()

    def effective_lr(self) -> float:
        return self.lr if self.lr is not None else 1.0 / max(self.iters, 1)
