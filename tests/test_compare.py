"""The Table 1 view of several runs: rows from result.json documents, and clear errors on bad folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from xdctools.commands.compare import compare
from xdctools.compare import (
    compare_rows,
    gap_closed,
    iterations_to_half_gain,
    k_label,
    load_run,
    mean_rows,
    render_markdown,
    render_seed_markdown,
    seed_rows,
)
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


def _curve(
    name: str, seed: int, video: list[float], audio: list[float], init: str = "random", width: float = 0.125
) -> dict:
    records = [
        {"iteration": i, "probe_video": v, "probe_audio": a, "probe_video_se": 0.02, "nmi_video": 0.1 * i}
        for i, (v, a) in enumerate(zip(video, audio, strict=True))
    ]
    return {"run": name, "method": "xdc", "seed": seed, "init": init, "width": width, "iterations": records}


def test_seed_rows_pair_each_run_with_its_own_start_and_count_iterations_to_half_the_gain():
    runs = [
        _curve("s0", 0, [0.2, 0.3, 0.5, 0.6, 0.7], [0.4, 0.8, 0.8, 0.8, 0.8]),
        _curve(
            "s2", 2, [0.1, 0.12, 0.09, 0.1, 0.05], [0.25, 0.28, 0.29, 0.28, 0.35], init="handcrafted-only"
        ),
    ]
    rows = seed_rows(runs)
    assert rows[0]["probe_video_start"] == 0.2 and rows[0]["probe_video_gain"] == pytest.approx(0.5)
    assert rows[0]["half_probe_video"] == 2  # 0.2 + 0.25 = 0.45: first reached at iteration 2 (0.5)
    assert rows[0]["half_probe_audio"] == 1 and rows[0]["nmi_video_gain"] == pytest.approx(0.4)
    assert rows[1]["probe_video_gain"] == pytest.approx(-0.05) and rows[1]["half_probe_video"] is None
    assert rows[1]["half_probe_audio"] == 4  # 0.25 + 0.05 first reached at the last iteration
    assert iterations_to_half_gain(runs[0]["iterations"], "probe_audio_se") is None  # no such column
    text = render_seed_markdown(rows)
    assert (
        "| s0 | XDC | 0 | random | 0.125 | 0.200 → 0.700 ± 0.020 (+0.500) | 0.400 → 0.800 (+0.400) |" in text
    )
    assert "| s2 | XDC | 2 | handcrafted-only | 0.125 |" in text and "| 4 | 2 / 1 |" not in text
    assert text.rstrip().endswith("video probe +0.225 ± 0.389, audio probe +0.250 ± 0.212.")
    late = {**runs[0], "iterations": [{"iteration": 3, "probe_video": 0.1}]}
    with pytest.raises(InputError, match="s0: its first recorded iteration is not iteration 0"):
        seed_rows([late])


def test_mean_rows_keep_inits_apart_and_report_the_share_of_the_gap_to_superv():
    runs = [
        _run("x", "xdc", START, {"iteration": 6, "probe_video": 0.6, "probe_audio": 0.45}),
        {**_run("h", "xdc", START, {"iteration": 6, "probe_video": 0.8}), "init": "handcrafted-only"},
        _run("s", "superv", START, {"iteration": 1, "probe_video": 1.0, "probe_audio": 0.25}),
    ]
    rows = mean_rows(runs)
    assert [r["label"] for r in rows] == ["Random init", "XDC", "XDC (handcrafted-only)", "Superv"]
    closed = gap_closed(rows)
    assert closed["XDC"] == {"probe_video": pytest.approx(0.5)}  # audio: Superv does not beat random init
    assert closed["XDC (handcrafted-only)"] == {"probe_video": pytest.approx(0.75)}
    text = render_markdown(rows)
    assert "gap closed: XDC video 0.50; XDC (handcrafted-only) video 0.75." in text
    assert gap_closed(rows[:3]) == {}  # no Superv row: no ceiling to measure against


def test_runs_of_another_width_are_another_row_and_another_start():
    """Seed 3 at width 0.125 and at 0.25 are two networks: never averaged, their starts counted apart."""
    runs = [
        _curve("s3", 3, [0.14, 0.10], [0.58, 0.65], init="handcrafted-only"),
        _curve("s4", 4, [0.11, 0.87], [0.33, 0.93], init="handcrafted-only"),
        _curve("s3-w25", 3, [0.13, 0.94], [0.50, 0.95], init="handcrafted-only", width=0.25),
    ]
    rows = mean_rows(runs)
    assert [(r["label"], r["run"]) for r in rows] == [
        ("Random init (width 0.125)", "iteration 0 (2 seeds)"),
        ("Random init (width 0.25)", "iteration 0 (1 seed)"),
        ("XDC (handcrafted-only, width 0.125)", "2 runs: s3, s4"),
        ("XDC (handcrafted-only, width 0.25)", "1 run: s3-w25"),
    ]
    assert rows[0]["probe_video"] == pytest.approx((0.14 + 0.11) / 2) and rows[1]["probe_video"] == 0.13
    assert rows[3]["probe_video"] == pytest.approx(0.94)
    randoms = ["Random init (width 0.125)", "Random init (width 0.25)"]
    assert [r["label"] for r in compare_rows(runs)][:2] == randoms
    assert [r["label"] for r in compare_rows(runs[:2])][1:] == ["XDC (handcrafted-only)"] * 2  # one width
    assert mean_rows(runs[:2])[0]["run"] == "iteration 0 (2 seeds)"
    assert "| s3-w25 | XDC | 3 | handcrafted-only | 0.25 |" in render_seed_markdown(seed_rows(runs))


def test_the_share_of_the_gap_is_taken_against_the_random_init_and_superv_of_the_same_width():
    runs = [
        _curve("x", 0, [0.2, 0.6], [0.4, 0.8]),
        {**_curve("s", 0, [0.2, 1.0], [0.4, 1.0]), "method": "superv", "init": None},
        _curve("x-w25", 0, [0.1, 0.9], [0.5, 0.9], width=0.25),
        {**_curve("s-w25", 0, [0.1, 0.5], [0.5, 0.7], width=0.25), "method": "superv", "init": None},
        _curve("x-w5", 0, [0.1, 0.5], [0.5, 0.7], width=0.5),  # no Superv of its width: no share
    ]
    for rows in (mean_rows(runs), compare_rows(runs)):
        closed = gap_closed(rows)
        assert closed["XDC (width 0.125)"] == pytest.approx({"probe_video": 0.5, "probe_audio": 2 / 3})
        assert closed["XDC (width 0.25)"] == pytest.approx({"probe_video": 2.0, "probe_audio": 2.0})
        assert set(closed) == {"XDC (width 0.125)", "XDC (width 0.25)"}
    text = render_markdown(mean_rows(runs))
    assert "gap closed: XDC (width 0.125) video 0.50, audio 0.67; XDC (width 0.25) video 2.00" in text


def test_compare_seeds_on_run_folders(tmp_path: Path):
    for name, seed in (("a", 0), ("b", 1)):
        run = tmp_path / name
        run.mkdir()
        records = [
            {"iteration": 0, "probe_video": 0.1, "probe_audio": 0.3},
            {"iteration": 1, "probe_video": 0.5},
        ]
        (run / "result.json").write_text(json.dumps({"iterations": records}))
        (run / "recipe.yaml").write_text(
            f"method: xdc\nseed: {seed}\nclustering:\n  k: 20\n  init: handcrafted\n"
        )
    out = CliRunner().invoke(compare, ["--seeds", str(tmp_path / "a"), str(tmp_path / "b")])
    assert out.exit_code == 0, out.output
    assert "| a | XDC | 0 | handcrafted | 1 | 0.100 → 0.500 (+0.400) | – |" in out.output  # no model: 1.0
    both = CliRunner().invoke(compare, ["--seeds", "--mean", str(tmp_path / "a")])
    assert both.exit_code == 2 and "--mean and --seeds are two different tables" in both.output
