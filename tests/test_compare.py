"""The Table 1 view of several runs: rows from result.json documents, and clear errors on bad folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from xdctools.commands.compare import compare
from xdctools.compare import compare_rows, k_label, load_run, mean_rows, render_markdown
from xdctools.errors import InputError


def _run(name: str, method: str, first: dict, last: dict, seed: int = 0) -> dict:
    return {"run": name, "method": method, "seed": seed, "iterations": [{"iteration": 0, **first}, last]}


START = {"probe_video": 0.2, "probe_audio": 0.25, "nmi_video": 0.05, "nmi_audio": 0.06}


def test_rows_take_random_init_from_iteration_0_and_each_method_from_its_last_iteration():
    runs = [
        _run("x", "xdc", START, {"iteration": 3, "probe_video": 0.6, "probe_audio": 0.7, "nmi_audio": 0.4}),
        _run("c", "cdc", START, {"iteration": 3, "probe_video": 0.5, "nmi_cdc": 0.3}),
        _run("s", "superv", {"probe_video": 0.2, "probe_audio": 0.25}, {"iteration": 1, "probe_video": 0.9}),
    ]
    rows = compare_rows(runs)
    assert [r["label"] for r in rows] == ["Random init", "XDC", "CDC", "Superv"]
    assert rows[0]["probe_audio"] == 0.25 and rows[0]["nmi_video"] == 0.05
    assert rows[0]["spread"] == dict.fromkeys(START, 0.0)  # every run starts from the same encoders
    assert rows[1]["iterations"] == 3 and rows[1]["nmi_video"] is None and rows[2]["nmi_cdc"] == 0.3
    text = render_markdown(rows)
    assert "| XDC | x | 3 | 0.600 | 0.700 | – | 0.400 | – |" in text
    assert "| Superv | s | 1 | 0.900 | – | – | – | – |" in text
    assert "differs" not in text


def test_k_per_view_is_a_column():
    runs = [
        {**_run("x", "xdc", START, {"iteration": 2, "probe_video": 0.6}), "k": "video 64, audio 128"},
        {**_run("c", "cdc", START, {"iteration": 2, "probe_video": 0.5}), "k": "256"},
        _run("s", "superv", START, {"iteration": 1, "probe_video": 0.9}),
    ]
    text = render_markdown(compare_rows(runs))
    assert "| method | run | iterations | k | video probe |" in text
    assert (
        "| XDC | x | 2 | video 64, audio 128 | 0.600 |" in text and "| Superv | s | 1 | – | 0.900 |" in text
    )
    assert "| Random init | iteration 0 | 0 | – |" in text
    means = mean_rows([*runs, {**runs[0], "run": "x1", "seed": 1, "k": "256"}])
    assert [r.get("k") for r in means] == [None, "256; video 64, audio 128", "256", None]
    assert k_label({"k": {"video": 64, "audio": 128}}) == "video 64, audio 128" and k_label(None) is None


def test_runs_that_start_differently_are_flagged():
    other = {**START, "probe_video": 0.3}
    rows = compare_rows(
        [_run("a", "xdc", START, {"iteration": 1}), _run("b", "sdc", other, {"iteration": 1})]
    )
    assert rows[0]["spread"]["probe_video"] == pytest.approx(0.1)
    assert "video probe by up to 0.100" in render_markdown(rows)


def test_mean_over_seeds_counts_each_random_start_once():
    other = {**START, "probe_video": 0.4}
    runs = [
        _run("x0", "xdc", START, {"iteration": 6, "probe_video": 0.5, "probe_audio": 0.6}, seed=0),
        _run("x1", "xdc", other, {"iteration": 6, "probe_video": 0.7, "probe_audio": 0.6}, seed=1),
        _run("s0", "sdc", START, {"iteration": 6, "probe_video": 0.1, "nmi_video": 0.2}, seed=0),
    ]
    rows = mean_rows(runs)
    assert [(r["label"], r["run"]) for r in rows] == [
        ("Random init", "iteration 0 (2 seeds)"),
        ("XDC", "2 runs: x0, x1"),
        ("SDC", "1 run: s0"),
    ]
    assert rows[0]["probe_video"] == pytest.approx(0.3)  # seed 0 counted once, not once per run
    assert rows[0]["probe_video_sd"] == pytest.approx(0.1414, abs=1e-4)
    assert rows[1]["probe_video"] == pytest.approx(0.6) and rows[1]["probe_audio_sd"] == 0.0
    assert rows[2]["probe_video_sd"] is None  # one run: no spread to report
    text = render_markdown(rows)
    assert "| XDC | 2 runs: x0, x1 | 6 | 0.600 ± 0.141 | 0.600 ± 0.000 | – | – |" in text
    assert "| SDC | 1 run: s0 | 6 | 0.100 | – | 0.200 | – |" in text


def test_unfinished_or_broken_run_folders_are_named(tmp_path: Path):
    with pytest.raises(InputError, match=r"run: not a finished training run \(result.json is missing\)"):
        load_run(tmp_path / "run")
    run = tmp_path / "run"
    run.mkdir()
    (run / "result.json").write_text(json.dumps({"iterations": []}))
    (run / "recipe.yaml").write_text("method: xdc\n")
    with pytest.raises(InputError, match=r"result\.json: no iterations recorded"):
        load_run(run)
    (run / "result.json").write_text("{not json")
    with pytest.raises(InputError, match="unreadable run files"):
        load_run(run)
    out = CliRunner().invoke(compare, [str(run)])
    assert out.exit_code == 3 and "unreadable run files" in out.output
