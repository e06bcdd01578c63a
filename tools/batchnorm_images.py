"""How many training images the BatchNorm recompute needs (docs/performance.md).

python tools/batchnorm_images.py --counts 0,8,16,32 -- --DATA_DIR=../shared/carvana_real --SEED=1

Runs train.py with the settings after `--`, and at each validation also scores the same averaged
weights with BatchNorm statistics recomputed from k of the training images, for each k of
--counts. The weights never depend on BATCHNORM_IMAGES (the recompute resets the average's
statistics and the training model never sees them), so for k > 0 one run gives the Dice that a run
at each BATCHNORM_IMAGES=k would print, on the images that run would draw. k = 0 scores the
average's running statistics as they are, which keep a share of the run's previous recompute (over
every training image), so it is close to, not exactly, a run at 0. The run itself recomputes over
every training image, and its checkpoints say so: they are for measuring, not for resuming.
A measurement tool: it wraps train.validate, which the product never does.
"""
import argparse
import copy
import functools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import train
from utils import evaluate, recompute_batchnorm, segmentation_loss


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="0,8,16,32", type=counts_of,
                        help="image counts to score, comma-separated")
    parser.add_argument("settings", nargs="*", help="train.py's --NAME=value settings (after --)")
    args = parser.parse_args(argv)
    counts = args.counts
    if any(setting.startswith("--BATCHNORM_IMAGES") for setting in args.settings):
        parser.error("--BATCHNORM_IMAGES is what this tool varies: give the counts as --counts")
    rows = []  # (epoch, k, Dice, seconds of the recompute)
    validate = train.validate

    def scoring_each_count(state, loaders, config, rank, world_size, stopwatch, worst=None):
        epoch = len({row[0] for row in rows}) + 1
        images = loaders.batchnorm.dataset  # every training image: the run's count is above them
        loss = functools.partial(segmentation_loss, kind=config["LOSS"])
        for count in counts:
            model = copy.deepcopy(state.average.model)
            started = time.perf_counter()
            if count:
                counted = {**config, "BATCHNORM_IMAGES": count}
                chosen = train.batchnorm_set(images.samples, counted, images.cache)
                loader = train.make_loader(chosen, config, state.device, 0)
                recompute_batchnorm(model, loader, state.device, state.amp_dtype)
            seconds = time.perf_counter() - started
            metrics = evaluate(loaders.val, model, state.device, config["THRESHOLD"],
                               state.amp_dtype, loss)
            rows.append((epoch, count, metrics["dice"], seconds))
        return validate(state, loaders, config, rank, world_size, stopwatch, worst)

    train.validate = scoring_each_count
    try:
        train.main([*args.settings, "--BATCHNORM_IMAGES=1000000"])
    finally:
        train.validate = validate
    if not rows:
        return  # no epoch ran (a finished run resumed): nothing to compare
    print("epoch\t" + "\t".join(f"k={count}" for count in counts))
    for epoch in sorted({row[0] for row in rows}):
        print(f"{epoch}\t" + "\t".join(f"{dice:.4f}" for e, _, dice, _ in rows if e == epoch))
    best = {count: max(dice for _, k, dice, _ in rows if k == count) for count in counts}
    print("best\t" + "\t".join(f"{best[count]:.4f}" for count in counts))
    seconds = {count: [s for _, k, _, s in rows if k == count] for count in counts}
    print("recompute s\t" + "\t".join(f"{sum(s) / len(s):.1f}" for s in seconds.values()))


def counts_of(text):
    try:
        counts = [int(count) for count in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated counts, got {text!r}") from None
    if min(counts) < 0:
        raise argparse.ArgumentTypeError(f"counts must be 0 or more, got {text!r}")
    return counts


if __name__ == "__main__":
    main()
