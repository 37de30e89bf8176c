"""A config file's fields as a table, and the one reading of a config by its table.

Each config this project reads (config.json's model hyperparameters in model/config.py, its
quantization_config in checkpoint/format.py) lists its fields as rows of `Field`: the name, the JSON
type, the value when the key is absent (REQUIRED: it must be there), whether null means the same as
absent, and the rule the value must keep. `read_fields` checks every row the same way, and the rules
between fields are rows of `Consistency`, checked by `check_consistency`. A failure names the file,
the field, what was expected and what was found (as JSON: null, "64", [64], true).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import KW_ONLY, dataclass
from typing import Any

from ..errors import SignroundError


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED = _Required()  # a field's `absent` when config.json must give it


@dataclass(frozen=True)
class Rule:
    says: str  # what a value must be, as a message reads it: "above 0"
    holds: Callable[[Any], bool]


ANY = Rule("", lambda v: True)
POSITIVE = Rule("above 0", lambda v: v > 0)
FRACTION = Rule("above 0 and at most 1", lambda v: 0 < v <= 1)
GROUP = Rule("-1 (one group per row) or above 0", lambda v: v == -1 or v > 0)


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true is not 1


def is_number(v) -> bool:
    return (is_int(v) or isinstance(v, float)) and math.isfinite(v)


def is_token_id(v) -> bool:
    return is_int(v) and v >= 0


def is_token_ids(v) -> bool:
    """A token id (an integer from 0), or a non-empty list of them (several eos ids)."""
    ids = v if isinstance(v, list) else [v]
    return bool(ids) and all(is_token_id(i) for i in ids)


# a field's type -> (its test, how a message names it)
TYPES = {
    "int": (is_int, "an integer"),
    "number": (is_number, "a finite number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "id": (is_token_id, "a token id (an integer from 0)"),
    "ids": (is_token_ids, "a token id (an integer from 0) or a list of them"),
}


@dataclass(frozen=True)
class Field:
    name: str
    type: str  # a key of TYPES
    _: KW_ONLY
    absent: Any = REQUIRED  # the value when the key is left out; None: derived from other fields by the reader
    nullable: bool = False  # null reads as absent
    rule: Rule = ANY

    def expects(self) -> str:
        what = TYPES[self.type][1] + (f" {self.rule.says}" if self.rule.says else "")
        return what + (" or null" if self.nullable else "")

    def accepts(self, value) -> bool:
        return TYPES[self.type][0](value) and self.rule.holds(value)


def found(value) -> str:
    """A value as config.json spells it."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def read_fields(config: Mapping, table: tuple[Field, ...], where: str, error: type[SignroundError],
                remedy: str = "correct it") -> dict[str, Any]:
    """Each field of table read from config: its value, or its `absent` value when the key is left out
    (or null, where null is allowed); `error` names `where`, the field, what it expects and what it found."""
    values = {}
    for f in table:
        value = config.get(f.name)
        if value is None and (f.name not in config or f.nullable):
            if f.absent is REQUIRED:
                said = "is null" if f.name in config else "is missing"
                raise error(f"{where}: {f.name} {said}; it must be {f.expects()} ({remedy})")
            values[f.name] = f.absent
        elif not f.accepts(value):
            raise error(f"{where}: {f.name} is {found(value)}; it must be {f.expects()} ({remedy})")
        else:
            values[f.name] = value
    return values


@dataclass(frozen=True)
class Consistency:
    fields: tuple[str, ...]  # the fields the rule ties, named in its message
    says: str  # what must hold, as a message reads it
    holds: Callable[[dict], bool]  # the test on read_fields' values (derived ones filled in)


def check_consistency(values: dict, rules: tuple[Consistency, ...], where: str, error: type[SignroundError],
                      remedy: str = "correct them") -> None:
    """error naming the first rule the values break, with the values of the fields it ties."""
    for rule in rules:
        if not rule.holds(values):
            given = ", ".join(f"{name} is {found(values[name])}" for name in rule.fields)
            raise error(f"{where}: {rule.says}, but {given} ({remedy})")
