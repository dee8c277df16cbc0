"""`xdctools finetune RECIPE`: transfer a pretrained encoder to a downstream dataset and table the results."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from xdctools.commands.train import recipe_arguments


def recipe_overrides(
    overrides: tuple[str, ...], checkpoint: str | None, mode: str | None, svm: bool, lr_sweep: bool
) -> list[str]:
    """The command's options as recipe overrides (after the --set ones, so the options win)."""
    if svm and mode not in (None, "svm"):
        raise click.BadParameter(f"--svm conflicts with --mode {mode}", param_hint="--svm")
    out = list(overrides)
    if checkpoint is not None:
        value = "null" if checkpoint.strip().lower() == "none" else json.dumps(checkpoint)
        out.append(f"model.checkpoint={value}")
    if svm:
        mode = "svm"
    if mode is not None:
        out.append(f"mode={mode}")
    if lr_sweep:
        out.append("optim.sweep=true")
    return out


def format_summary(summary: dict[str, Any]) -> str:
    """The closing lines: the reported accuracy (multi-label: mAP) per split, the best lr, where the
    table is."""
    if "map" in summary:
        splits = ", ".join(f"{name} {value:.4f}" for name, value in summary["splits"].items())
        score = f"mAP {summary['map']:.4f}"
    else:
        splits = ", ".join(f"{name} {100 * acc:.2f}" for name, acc in summary["splits"].items())
        score = f"{100 * summary['accuracy']:.2f}%"
    line = f"{summary['method']} on {summary['title']} ({summary['column']}): {score}"
    lines = [line + f" mean over {len(summary['splits'])} split(s) [{splits}]"]
    sweep = summary.get("sweep") or []
    if len(sweep) > 1:
        tried = ", ".join(f"{row['lr']:g}" for row in sweep)
        lines.append(f"best lr {summary['best_lr']:g} of {tried}")
    if summary.get("table"):
        lines.append(f"table: {summary['table'][1]} ({summary['table'][0]})")
    lines.append(f"run: {summary['run']}")
    return "\n".join(lines)


@click.command("finetune")
@recipe_arguments("--set optim.lr=0.01 or --set data.splits=[1]")
@click.option(
    "--checkpoint",
    metavar="PATH|none",
    default=None,
    help="Pretrained weights: an `xdctools train` checkpoint or encoders.pt, the official XDC video "
    ".pth, a torchvision-layout state dict; 'none' for Scratch. Default: the recipe's model.checkpoint.",
)
@click.option(
    "--mode",
    type=click.Choice(["full", "fc", "svm"]),
    default=None,
    help="full: finetune everything; fc: frozen encoder, linear classifier only; svm: linear SVM on "
    "frozen features (DCASE style). Default: the recipe's.",
)
@click.option("--svm", is_flag=True, help="Same as --mode svm.")
@click.option(
    "--lr-sweep",
    is_flag=True,
    help="Cross-validate the base lr over optim.lrs (default: Table 12's list x optim.lr_factor).",
)
@click.option("--quiet", is_flag=True, help="No progress lines.")
def finetune(
    recipe_path: Path,
    overrides: tuple[str, ...],
    checkpoint: str | None,
    mode: str | None,
    svm: bool,
    lr_sweep: bool,
    quiet: bool,
) -> None:
    """Finetune (or fc-only, or SVM) a pretrained encoder on a downstream dataset's official splits.

    Test accuracy: 10 clips per video, softmax averaged per video, mean over the splits (UCF101/HMDB51:
    3 splits; ESC-50: 5 folds). Multi-label sets (AudioSet) train with binary cross-entropy and score
    mAP (sigmoid averaged per video). Results merge into RUN_OUT/results.md and results.json. Reruns
    skip finished (lr, split) pairs and resume unfinished ones. Under torchrun, every rank runs it.
    """
    from trainer import distributed
    from xdctools.eval_recipe import load_eval_recipe

    recipe = load_eval_recipe(recipe_path, recipe_overrides(overrides, checkpoint, mode, svm, lr_sweep))

    def progress(message: str) -> None:
        if not quiet and distributed.is_main():
            click.echo(message, err=True)

    if recipe.mode == "svm":
        from trainer.evaluate.svm import run_svm

        summary = run_svm(recipe, progress)
    else:
        from trainer.evaluate.finetune import run_finetune

        summary = run_finetune(recipe, progress)
    if distributed.is_main():
        click.echo(format_summary(summary))
    distributed.cleanup()
