"""The CLI's one progress display (`xdctools.commands.progress.StageBars`): a bar per stage, made lazily."""

from __future__ import annotations

import pytest

from xdctools.commands.progress import StageBars


def test_one_bar_per_stage_created_at_its_first_report(capsys: pytest.CaptureFixture[str]) -> None:
    with StageBars(lambda stage: "it" if stage == "train" else "row") as bars:
        assert bars.bar is None  # nothing drawn before the first report: an early error prints no bar
        bars("train", 3, 20)
        first = bars.bar
        assert (first.n, first.total, first.unit, first.desc) == (3, 20, "it", "train")
        bars("train", 20, 20, loss=0.12345, step=7)
        assert bars.bar is first and first.n == 20 and first.postfix == "loss=0.123, step=7"
        bars("assign", 100, 1000)
        assert bars.bar is not first and bars.bar.unit == "row" and first.disable  # the old bar closed
        for _ in range(3):
            bars.advance("digits", 5)
        assert (bars.bar.desc, bars.bar.n, bars.bar.total) == ("digits", 3, 5)
    assert bars.bar is None  # closed on leaving the block
    assert "train" in capsys.readouterr().err
