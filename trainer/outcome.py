"""The end of a run: report.md, encoders.pt and result.json (rank 0), and the result a finished run left.

trainer.log renders metrics.jsonl into plots and report.md; this module decides what a finished run
leaves beside them: the final encoders (the file `xdctools extract`, finetune and retrain read) and
result.json, which is also the marker that makes a rerun of the same recipe return at once.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer import distributed
from trainer.checkpoint import save_checkpoint
from trainer.log import hardware_info, read_metrics, write_report
from trainer.optim import effective_block
from trainer.state import State, encoder_config
from xdctools.atomic import write_bytes_atomic
from xdctools.errors import DataError
from xdctools.recipe import Recipe, recipe_digest

if TYPE_CHECKING:
    from trainer.session import Session

RESULT_FILE = "result.json"
ENCODERS_FILE = "encoders.pt"


@dataclass(frozen=True)
class RunResult:
    """What a run produced: where, and per iteration NMI / losses / probe accuracy (rank 0's view)."""

    run_dir: Path
    report: Path
    iterations: list[dict[str, Any]]
    seconds: float
    resumed_complete: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "report": str(self.report),
            "iterations": self.iterations,
            "seconds": self.seconds,
        }


def finish(s: Session, state: State) -> RunResult:
    """Plots, report.md, encoders.pt and result.json (rank 0); every rank gets the result."""
    result = None
    if s.dist.is_main:
        s.logger.flush()
        s.logger.plot()
        rows = per_iteration(read_metrics(s.run_dir))
        seconds = time.time() - s.started
        final = {
            "final" if r["iteration"] == s.recipe.iterations else f"iteration {r['iteration']}": {
                k: v for k, v in r.items() if k != "iteration"
            }
            for r in rows
        }
        report = write_report(
            s.run_dir,
            s.recipe,
            {
                "status": f"Finished {s.recipe.iterations} iteration(s), {state.step} optimizer steps.",
                "seconds": seconds,
                "data": {
                    "videos": s.catalog.num_videos,
                    "segments": len(s.shards),
                    "held out": int(s.held_out.sum()),
                },
                "hardware": hardware_info(s.dist.world_size),
                "effective": effective_block(s.recipe, s.dist.world_size),
                "final": final,
            },
        )
        save_checkpoint(
            s.run_dir / ENCODERS_FILE,
            {
                "config": encoder_config(s.recipe),
                "model": {k: v.cpu() for k, v in s.learner.state_dict().items()},
            },
            digest=s.digest,
        )
        result = RunResult(s.run_dir, report, rows, seconds)
        doc = {"digest": s.digest, **result.to_json()}
        write_bytes_atomic(s.run_dir / RESULT_FILE, json.dumps(doc, indent=1).encode())
    s.logger.close()
    result = distributed.broadcast_object(result)
    return result


def finished_result(run_dir: Path, recipe: Recipe) -> RunResult | None:
    """The result of a run that already finished with this recipe, or None."""
    path = run_dir / RESULT_FILE
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable ({e}); delete it to let the run finish again") from None
    if doc.get("digest") != recipe_digest(recipe):
        return None
    return RunResult(Path(doc["run_dir"]), Path(doc["report"]), doc["iterations"], doc["seconds"], True)


def per_iteration(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per iteration (and 'final'): NMI per view, last train/val loss, epochs, probe accuracy (and
    its standard error)."""
    rows: dict[int, dict[str, Any]] = {}
    for r in records:
        it = r.get("iteration")
        if it is None:
            continue
        row = rows.setdefault(int(it), {"iteration": int(it)})
        if r["event"] == "cluster" and r.get("nmi") is not None:
            row[f"nmi_{r['view']}"] = r["nmi"]
        elif r["event"] == "epoch":
            row["epochs"] = r["epoch"]
            row["train_loss"] = r.get("train_loss")
            row["val_loss"] = r.get("val_loss")
        elif r["event"] == "probe":
            metric = "map_" if "map" in r else ""  # mAP on a multi-label set, else accuracy
            row[f"probe_{metric}{r['modality']}"] = r.get("map", r.get("accuracy"))
            if r.get("se") is not None:  # the accuracy's standard error over the videos scored
                row[f"probe_{r['modality']}_se"] = r["se"]
        elif r["event"] == "iteration":
            row["stopped_early"] = r.get("stopped_early")
    return [rows[i] for i in sorted(rows)]
