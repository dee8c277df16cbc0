"""The one atomic writer: whole files or the old ones, never a partial file or a stray temp."""

from __future__ import annotations

from pathlib import Path

import pytest

from xdctools.atomic import write_atomic, write_bytes_atomic, write_text_atomic


def test_replaces_whole_files_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "report.md"
    write_bytes_atomic(target, b"one")
    write_text_atomic(target, "twö\n")
    assert target.read_text(encoding="utf-8") == "twö\n"
    assert [p.name for p in target.parent.iterdir()] == ["report.md"]


def test_a_failing_writer_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "result.json"
    target.write_bytes(b"old")

    def half_then_fail(f) -> None:
        f.write(b"new but ")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, half_then_fail)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_a_named_temp_is_used_and_gone(tmp_path: Path) -> None:
    target, tmp = tmp_path / "unit.json", tmp_path / "unit.json.0.tmp"
    seen: list[bool] = []
    write_atomic(target, lambda f: (seen.append(tmp.exists()), f.write(b"{}")), tmp=tmp)
    assert seen == [True] and target.read_bytes() == b"{}" and not tmp.exists()
