"""Data-parallel tuning with torch.distributed: which rank this process is, and the collectives a
SignRound step needs.

Under `torchrun --nproc-per-node N` (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment)
joined() starts the process group: gloo on CPU, NCCL on CUDA. Without that environment, or with
WORLD_SIZE 1, nothing is started and World() is the single process: every collective below returns
its input as it is, so one process runs the same program bit for bit.

The split: each rank holds a contiguous share of the calibration samples, rank r samples r*m to
(r+1)*m - 1 of nsamples = m * size. Contiguous rather than strided because, when m is a multiple of
batch_size, a rank's batched passes (the input statistics, the float targets, the next inputs) see
the very batches one process does, so their results are the single process's bit for bit, and the
input statistics' per-batch sums can be added in the single process's order (ordered_sums).
"""

from __future__ import annotations

import datetime
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.distributed as dist

from ..errors import SignroundError, TuneError

DP_REDUCES = ("sum", "sign")  # the gradients' float sum (exact); the int8 signs' majority vote
TIMEOUT_ENV = "SIGNROUND_DIST_TIMEOUT"  # seconds a rank waits for the others at a collective
DEFAULT_TIMEOUT = 1800.0
LOSS_BYTES = 8  # the float64 loss reduced at every step
T = TypeVar("T")


@dataclass
class World:
    rank: int = 0
    size: int = 1
    reduce: str = "sum"  # of DP_REDUCES
    timeout: float = DEFAULT_TIMEOUT
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where NCCL's buffers live
    traffic: dict = field(default_factory=dict)  # the current block's reductions (count)
    blocks: list[dict] = field(default_factory=list)  # each finished block's (note_block)

    @property
    def root(self) -> bool:
        """Rank 0: the one that reads and writes files."""
        return self.rank == 0

    def share(self, samples: torch.Tensor) -> torch.Tensor:
        """This rank's rows of the global samples (all of them, as a view, in a single process)."""
        m = len(samples) // self.size
        return samples[self.rank * m : (self.rank + 1) * m]

    def local(self, idx: torch.Tensor, m: int) -> torch.Tensor:
        """The positions in share() (of m samples) of those global sample indices idx this rank holds, in
        idx's order."""
        return idx[idx // m == self.rank] - self.rank * m

    def check(self, config) -> None:
        """Refuse settings the split cannot serve: an uneven share of samples or of the batch, a vote on
        signs for an optimizer that does not step by them."""
        if self.reduce not in DP_REDUCES:
            raise TuneError(f"`dp_reduce` {self.reduce!r}: choose one of {', '.join(DP_REDUCES)}", param="dp_reduce")
        if self.reduce == "sign" and config.optimizer != "signsgd":
            raise TuneError(f"`dp_reduce` 'sign' votes on the gradients' signs, which only `optimizer` signsgd steps "
                            f"by; use `dp_reduce` 'sum' with `optimizer` {config.optimizer!r}", param="dp_reduce")
        if not config.uses_data():
            return
        for name in ("nsamples", "batch_size"):
            value = getattr(config, name)
            if value % self.size:
                raise TuneError(f"`{name}` {value} is not a multiple of the world size {self.size} (torchrun's "
                                f"processes): each rank holds an equal share; give a multiple of {self.size}, or "
                                "run another number of processes", param=name)

    # -- collectives: each returns its input unchanged in a single process -------------------------

    def total(self, loss: torch.Tensor | None) -> float:
        """The sum over ranks of each one's share of a batch's loss (None: this rank holds none of it)."""
        if self.size == 1:
            return loss.item()
        t = torch.tensor([0.0 if loss is None else loss.item()], dtype=torch.float64, device=self.device)
        self.collective("the loss", dist.all_reduce, t)
        return t.item()

    def reduce_grads(self, tensors: list[torch.Tensor]) -> None:
        """Every rank's gradients of tensors made one: their sum ("sum"), or the majority of their signs
        ("sign": each rank's int8 signs summed, then the sign of the sum, 0 on a tie). A tensor without a
        gradient (this rank held none of the batch) counts as zeros."""
        if self.size == 1:
            return
        grads = [torch.zeros_like(t) if t.grad is None else t.grad for t in tensors]
        flat = torch.cat([g.reshape(-1) for g in grads])
        if self.reduce == "sign":  # int8 holds the sum of up to 127 votes
            flat = flat.sign().to(torch.int8 if self.size < 128 else torch.int32)
        self.collective("the gradients", dist.all_reduce, flat)
        if self.reduce == "sign":
            flat = flat.sign().float()
        for t, g in zip(tensors, flat.split([g.numel() for g in grads])):
            t.grad = g.view_as(t).to(t.dtype)
        self.count(sum(g.numel() for g in grads))

    def count(self, numel: int) -> None:
        """One step's reduction of numel gradients: what each way of reducing sends per rank."""
        t = self.traffic
        t["steps"] = t.get("steps", 0) + 1
        t["bytes_per_step"] = step_bytes(numel, self.size)

    def note_block(self, i: int) -> None:
        """Block i is tuned: its reductions go into the log."""
        if self.traffic:
            self.blocks.append({"block": i} | self.traffic)
        self.traffic = {}

    def fingerprint(self) -> dict:
        """What a resumed run must share with the one it resumes, beyond the tuning settings."""
        return {} if self.size == 1 else {"world_size": self.size, "dp_reduce": self.reduce}

    def log(self) -> dict | None:
        """The tuning log's record of the ranks (none for a single process): each tuned block's steps and
        the bytes one rank contributes to a step's reductions, for either way of reducing."""
        return None if self.size == 1 else self.fingerprint() | {"timeout_s": self.timeout, "blocks": self.blocks}

    def ordered_sums(self, parts: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Each name's per-batch sums over every rank's batches, added one after another in the order of
        the samples: the single process's sum, whatever the world size, when the ranks' batches are its
        batches (share())."""
        sums = {}
        for name, mine in parts.items():
            every = torch.stack(mine)
            if self.size > 1:
                gathered = [torch.empty_like(every) for _ in range(self.size)]
                self.collective("the input statistics", dist.all_gather, gathered, every)
                every = torch.cat(gathered)
            total = every[0]
            for s in every[1:]:
                total = total + s
            sums[name] = total
        return sums

    def from_root(self, fn: Callable[[], T]) -> T:
        """fn() run by rank 0 alone (it reads and writes files), its result (or its refusal) given to
        every rank."""
        if self.size == 1:
            return fn()
        box = [None]
        if self.root:
            try:
                box[0] = (True, fn())
            except SignroundError as e:
                box[0] = (False, e)
        self.collective("rank 0's result", dist.broadcast_object_list, box, src=0)
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def agree(self, settings: dict[str, object]) -> None:
        """Refuse ranks started with different settings, naming each that differs and its values."""
        if self.size == 1:
            return
        mine = {k: str(v) for k, v in settings.items()}
        every: list[dict[str, str]] = [{} for _ in range(self.size)]
        self.collective("the settings", dist.all_gather_object, every, mine)
        differ = [k for k in mine if any(other.get(k) != mine[k] for other in every)]
        if differ:
            what = "; ".join(f"{k} ({', '.join(f'rank {r}: {short(o.get(k))}' for r, o in enumerate(every))})"
                             for k in differ)
            raise TuneError(f"the ranks were started with different settings: {what}; start every rank with the "
                            "same arguments")

    def collective(self, what: str, op: Callable, *args, **kwargs):
        try:
            return op(*args, **kwargs)
        except RuntimeError as e:  # gloo and NCCL raise theirs as RuntimeErrors
            raise TuneError(f"rank {self.rank} of {self.size}: exchanging {what} failed: another rank stopped or did "
                            f"not answer within {self.timeout:g} s ({TIMEOUT_ENV}): {first_line(e)}; rerun with the "
                            "same arguments and world size to resume from the last finished block") from e


SOLO = World()  # a single process: no collective ever changes its state


def step_bytes(numel: int, size: int) -> dict[str, int]:
    """The bytes one rank puts into a step's reductions of numel gradients, either way of reducing: float32
    gradients ("sum"), or their signs as int8 ("sign"; int32 from 128 ranks on, where int8 could overflow),
    plus the loss."""
    return {"sum": 4 * numel + LOSS_BYTES, "sign": (1 if size < 128 else 4) * numel + LOSS_BYTES}


def short(value: str | None, limit: int = 80) -> str:
    return "-" if value is None else value if len(value) <= limit else value[: limit - 3] + "..."


def first_line(e: BaseException) -> str:
    """The backend's own words, without its source location and advice: "Connection reset by peer"."""
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return re.sub(r"^\[[^\]]*\]\s*", "", line).split(". ")[0]


def timeout_seconds() -> float:
    value = os.environ.get(TIMEOUT_ENV, "")
    try:
        seconds = float(value) if value else DEFAULT_TIMEOUT
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        raise TuneError(f"{TIMEOUT_ENV} {value!r}: give the seconds a rank waits for the others, a positive number")
    return seconds


def world_size() -> int:
    """The processes torchrun started (WORLD_SIZE), 1 outside torchrun."""
    value = os.environ.get("WORLD_SIZE", "1")
    if not value.isdigit() or int(value) < 1:
        raise TuneError(f"WORLD_SIZE {value!r}: torchrun sets it to the number of processes; unset it outside torchrun")
    return int(value)


@contextmanager
def joined(device: str = "auto", reduce: str = "sum") -> Iterator[World]:
    """The World this process is part of: started from torchrun's environment (gloo on CPU, NCCL when
    `device` resolves to CUDA, each local rank on its own GPU) and ended on leaving; a single process
    when the environment names no world of more than one."""
    size = world_size()
    if size == 1:
        yield World(reduce=reduce)
        return
    timeout = timeout_seconds()
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    place = torch.device("cpu")
    if cuda:
        place = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(place)
    started = not dist.is_initialized()
    if started:
        try:
            dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout))
        except (RuntimeError, ValueError) as e:
            raise TuneError(f"starting the process group of {size} ranks failed within {timeout:g} s ({TIMEOUT_ENV}): "
                            f"{first_line(e)}; launch every rank with torchrun and the same --rdzv-endpoint") from e
    try:
        yield World(dist.get_rank(), dist.get_world_size(), reduce, timeout, place)
    finally:
        if started:
            dist.destroy_process_group()
