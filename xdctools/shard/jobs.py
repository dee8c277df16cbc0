"""What the planner hands to the workers: one Job per input file, grouped into shard sets."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Job:
    """One input file to shard. Picklable: workers receive it as is."""

    set_name: str  # shard set it belongs to: "train", "split1-test", "fold3", ...
    index: int  # global video index within the set: its position in the plan
    path: str  # absolute path of the input file
    name: str  # relative name, used in the sample key and metadata ("using segway/abc_000001_000011")
    label: str | None = None
    class_index: int = -1  # -1 when the label is unknown
    start: float | None = None  # trim to [start, end] seconds when given
    end: float | None = None
    audio_only: bool = False
    extra: tuple[tuple[str, str | int], ...] = ()  # split/fold bookkeeping, copied to metadata


@dataclass
class Plan:
    """Everything `shard` will do, computed from the inputs alone (no media is opened)."""

    kind: str  # "class-tree", "kinetics-csv", "ucf101", "hmdb51", "esc50", "manifest", "audio"
    classes: list[str]  # class names; a Job's class_index indexes this list
    sets: dict[str, list[Job]]  # set name -> jobs in index order
    audio_required: bool  # default policy of this input kind (the CLI flag overrides it)
    missing: list[dict] = field(default_factory=list)  # annotated files not found: {"path", "reason"}
    shuffle_seed: int | None = None  # None: jobs in name order; else permuted by `plan.shuffle_plan`
