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
    # Multi-label inputs (AudioSet): every class of the video, sorted by index; class_index is then -1.
    labels: tuple[str, ...] = ()
    class_indices: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        indices = list(self.class_indices)
        if len(self.labels) != len(indices) or indices != sorted(set(indices)) or min(indices, default=0) < 0:
            raise ValueError(
                f"{self.name}: class indices {indices} must be sorted, distinct, >= 0, one per label"
            )


@dataclass
class Plan:
    """Everything `shard` will do, computed from the inputs alone (no media is opened)."""

    kind: str  # one of plan.KINDS: "class-tree", "kinetics-csv", "audioset-csv", "ucf101", ...
    classes: list[str]  # class names; a Job's class_index (or class_indices) indexes this list
    sets: dict[str, list[Job]]  # set name -> jobs in index order
    audio_required: bool  # default policy of this input kind (the CLI flag overrides it)
    missing: list[dict] = field(default_factory=list)  # annotated files not found: {"path", "reason"}
    shuffle_seed: int | None = None  # None: jobs in name order; else permuted by `plan.shuffle_plan`
    multi_label: bool = False  # jobs carry a list of classes (class_indices), not one class
    class_ids: list[str] = field(default_factory=list)  # the classes' own ids, if any (AudioSet MIDs)
