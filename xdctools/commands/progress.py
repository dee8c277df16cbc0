"""The one progress display of the CLI: library progress callbacks drawn as tqdm bars, one per stage."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class StageBars:
    """A progress callback `bars(stage, done, total, **info)`: one tqdm bar per stage, replaced when the
    stage changes, `info` shown after the counts. A bar is created at its stage's first report, so a
    command that fails on its input prints no empty bar. Use as a context manager (or call `close`).

    unit: the bar's unit, or a function of the stage name giving it. leave: keep finished bars on screen.
    """

    def __init__(self, unit: str | Callable[[str], str] = "it", *, leave: bool = False) -> None:
        self.unit, self.leave = unit, leave
        self.bar: Any = None
        self.stage: str | None = None

    def __call__(self, stage: str, done: int, total: int, **info: Any) -> None:
        if stage != self.stage or self.bar is None:
            from tqdm import tqdm

            self.close()
            self.stage = stage
            unit = self.unit(stage) if callable(self.unit) else self.unit
            self.bar = tqdm(
                total=total, desc=stage, unit=unit, unit_scale=True, leave=self.leave, dynamic_ncols=True
            )
        if info:
            postfix = {k: f"{v:.3f}" if isinstance(v, float) else v for k, v in info.items()}
            self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(done - self.bar.n)

    def advance(self, stage: str, total: int) -> None:
        """One more item of `stage` done (for callbacks that report each item, not a count)."""
        done = self.bar.n + 1 if self.bar is not None and stage == self.stage else 1
        self(stage, done, total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> StageBars:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
