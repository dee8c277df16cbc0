"""Which recipe fields a run actually reads: "a flag that nothing reads must not exist" as a test helper.

`field_reads()` records every (section class, field) read as an attribute while it is active, except
reads by the report writer (trainer.log, which prints every field) and by the recipes' own validators
(methods named `_...` in xdctools.recipe / xdctools.eval_recipe), so a field counts only when code that
acts on it reads it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from xdctools.recipe import Section

NOT_ACTING = ("trainer.log",)


def _counts(frame) -> bool:
    module = frame.f_globals.get("__name__", "")
    if module in NOT_ACTING:
        return False
    return not (
        module in ("xdctools.recipe", "xdctools.eval_recipe") and frame.f_code.co_name.startswith("_")
    )


@contextmanager
def field_reads() -> Iterator[set[tuple[str, str]]]:
    reads: set[tuple[str, str]] = set()
    original = Section.__getattribute__

    def spy(self, name):
        value = original(self, name)
        if name in type(self).model_fields and _counts(sys._getframe(1)):
            reads.add((type(self).__name__, name))
        return value

    Section.__getattribute__ = spy
    try:
        yield reads
    finally:
        Section.__getattribute__ = original


def all_fields(*sections: type[Section]) -> set[tuple[str, str]]:
    return {(cls.__name__, name) for cls in sections for name in cls.model_fields}
