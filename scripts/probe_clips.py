"""The digits probe of one checkpoint with 1 and with N clips per video: what `run.probe_clips` buys.

For each clip count, each video's feature is the mean of that many evenly spaced clips (centre crop,
`eval_loader`, encoders in eval mode: the loop's `probe_run.clip_means`); a logistic regression fitted on
the train set scores the test set, with its binomial standard error. Prints accuracy ± se and the
seconds spent extracting, per encoder and clip count. Run from the repository root:

    .venv/bin/python scripts/probe_clips.py runs/digits-hco-s0/encoders.pt --recipe recipes/digits.yaml \
        --shards digits/shards --clips 1,10
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from trainer import sampling
from trainer.data import Runtime, eval_loader, find_shards
from trainer.evaluate.probe import binomial_se, linear_probe
from trainer.extract import encoded_clips, load_encoders
from trainer.session import clip_spec
from xdctools.recipe import load_recipe


def clip_means(encoders, shards, clip, clips: int, threads: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """modality -> (videos, d) mean feature of `clips` clips per video, and each video's label."""
    loader = eval_loader(shards, batch_size=max(1, 32 // clips), num_clips=clips, clip=clip,
                         run=Runtime(num_threads=threads))  # fmt: skip
    feats, index, label = {m: [] for m in encoders}, [], []
    for batch, out in encoded_clips(encoders, loader, device="cpu"):
        for m, x in out.items():
            feats[m].append(x)
        index.append(batch["index"].numpy())
        label.append(batch["label"].numpy())
    index, label = np.concatenate(index), np.concatenate(label)
    videos, first = np.unique(index, return_index=True)
    means = {m: sampling.mean_per_video(np.concatenate(x), index)[1] for m, x in feats.items()}
    assert all(len(x) == len(videos) for x in means.values())
    return means, label[first]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--recipe", required=True)
    p.add_argument("--shards", required=True)
    p.add_argument("--clips", default="1,10")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    recipe = load_recipe(args.recipe, [f"data.shards={args.shards}"])
    encoders = load_encoders(args.checkpoint).encoders
    sets = {name: find_shards(args.shards, name) for name in ("train", "test")}
    clip = clip_spec(recipe, sets["train"])
    for clips in (int(c) for c in args.clips.split(",")):
        start = time.perf_counter()
        data = {name: clip_means(encoders, s, clip, clips, args.threads) for name, s in sets.items()}
        seconds = time.perf_counter() - start
        (train, train_y), (test, test_y) = data["train"], data["test"]
        for m in encoders:
            acc = linear_probe(train[m], train_y, test[m], test_y, seed=recipe.seed)
            se = binomial_se(acc, len(test_y))
            print(f"{m}: {clips} clip(s): {acc:.3f} ± {se:.3f} on {len(test_y)} test videos; "
                  f"extraction of both sets {seconds:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()
