"""A test's view of how much of a model a stage holds at once.

Resident wraps a dict of tensors (or QuantWeights) as a Mapping whose every indexing returns a fresh
copy, and counts, through weak references, the decoder blocks that have at least one of their entries
alive at the same time. A stage that reads a block, uses it and drops it keeps `peak_blocks` at 1 or 2;
one that collects every block first reaches the model's depth.
"""

from __future__ import annotations

import copy
import gc
import re
import weakref
from collections import Counter
from collections.abc import Mapping

BLOCK = re.compile(r"^model\.layers\.(\d+)\.")


class Resident(Mapping):
    def __init__(self, entries: Mapping):
        self.entries = entries
        self.live: Counter = Counter()  # block -> entries of it alive now
        self.reads: Counter = Counter()  # name -> times read
        self.peak_blocks = 0

    def __getitem__(self, name):
        item = copy.deepcopy(self.entries[name])
        self.reads[name] += 1
        m = BLOCK.match(name)
        if m is not None:
            block = int(m.group(1))
            self.live[block] += 1
            self.peak_blocks = max(self.peak_blocks, sum(1 for n in self.live.values() if n > 0))
            weakref.finalize(item, self._drop, block)
        return item

    def _drop(self, block: int) -> None:
        self.live[block] -= 1

    def __contains__(self, name) -> bool:
        return name in self.entries

    def __iter__(self):
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def resident_now(self) -> int:
        gc.collect()
        return sum(1 for n in self.live.values() if n > 0)
