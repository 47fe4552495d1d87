"""What train.py checks of its rows before the first step, and says: the images that cannot be
read (--check-data, --bad-samples skip), which split trains, and how often RandomResizedCrop
falls back to its fixed centre crop on these images (RULE 5)."""
import os

import numpy as np

import data
from support.csv_table import data_row
from support.distributed import gather_objects
from support.errors import UsageError
from support.files import write_json
from support.train_flags import image_root

def usable_samples(args, rows, run_dir, proc):
    """Indices of the rows to train on: all of them, or, with --bad-samples skip, all but those
    whose image or caption cannot be used (each rank reads a share; --check-data only lists)."""
    if not (args.check_data or args.bad_samples == "skip"):
        return np.arange(len(rows))
    # Each rank reads its share of the images (with its workers); everybody gets the whole list.
    share = range(proc.rank, len(rows), proc.world)
    found = data.find_bad_samples(rows, share, image_root(args), args.workers,
                                  args.max_image_pixels)
    bad = {}
    for part in gather_objects(found):
        bad.update(part)
    listed = os.path.join(run_dir, "bad_samples.json")
    if proc.is_main:
        listing = {f"data row {data_row(rows, i)}": bad[i] for i in sorted(bad)}
        write_json(listed, listing)
        if args.bad_samples == "skip":
            print(f"--bad-samples skip: {len(bad):,} of {len(rows):,} rows left out, "
                  f"listed in {listed}")
    if bad and args.bad_samples == "error":
        first = min(bad)
        raise UsageError(f"{args.train_data}: {len(bad)} bad rows; data row "
                         f"{data_row(rows, first)} "
                         f"({rows[first][0]}): {bad[first]}. All are in {listed}: fix them or "
                         "pass --bad-samples skip.")
    return np.delete(np.arange(len(rows)), sorted(bad))


def report_split(args, split_filter):
    """Say which rows train: rows a dataset holds out are never trained on silently."""
    kept = split_filter["rows_kept"]
    total = split_filter["rows_in_csv"]
    column = split_filter["column"]
    if not split_filter["column_present"]:
        print(f"train rows: all {total:,} ({args.train_data} has no column '{column}')")
    elif split_filter["value"] == "all":
        print(f"train rows: all {total:,}, every value of '{column}' (--train-split all)")
    else:
        print(f"train rows: {kept:,} of {total:,} ({column} == {split_filter['value']!r}); "
              f"{total - kept:,} held out")


def report_crop_fallback(args, rows, sizes):
    """The share of crops that are RandomResizedCrop's fixed centre crop on these images, with
    a warning above 25%; None when no image size could be read."""
    # RULE 5: on 16:9 video frames a crop of >= 0.8 of the area never has an aspect <= 4/3, so
    # every try fails and each epoch sees the same centre crop: say so before training.
    measured = data.image_sizes(rows, image_root(args), sizes)
    share = data.crop_fallback_share(measured, args.rrc_scale, args.rrc_ratio)
    if share is None:
        return None
    low, high = args.rrc_ratio
    print(f"RandomResizedCrop: scale ({args.rrc_scale}, 1), ratio ({low:.3g}, {high:.3g}): "
          f"{share:.0%} of crops on these images fall back to a fixed centre crop")
    if share > 0.25:
        wide = data.crop_fallback_share(measured, args.rrc_scale, (9 / 16, 16 / 9))
        lower = data.crop_fallback_share(measured, 0.6, args.rrc_ratio)
        print(f"warning: {share:.0%} of training crops are the same centre crop in every epoch "
              f"(wide frames, such as 16:9 video). --rrc-ratio 0.5625 1.778 gives {wide:.0%}, "
              f"--rrc-scale 0.6 gives {lower:.0%} (see RULES.md, rule 5).")
    return share
