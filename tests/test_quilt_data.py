"""QUILT-1M's CSV and video frames: held-out rows are never trained on silently, and the crop
augmentation says when it does nothing. Real CSVs and JPEGs in tmp_path, torchvision itself as
the reference for the crop estimate.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_quilt_data.py tests/test_robustness.py \
        -k "csv or path or image"
"""
import csv
import sys

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

import data
from support.errors import UsageError
from support import bench_data, csv_table

FRAME_SIZES = [(160, 90), (128, 72), (64, 36), (96, 72), (48, 36)]  # three 16:9, two 4:3
WIDE = (9 / 16, 16 / 9)


def quilt_row(index, split, width, height):
    """One row as QUILT-1M writes it; its caption has a comma, quotes and a line break."""
    caption = f'frame {index}: "tumour, grade {index % 3}"\nsecond line'
    return {"": index, "caption": caption, "image_path": f"frames/{index:03d}.jpg",
            "subset": "youtube", "split": split, "pathology": "['breast']",
            "roi_text": "[]", "noisy_text": "['a, b']", "corrected_text": "[]",
            "med_umls_ids": "[]", "magnification": 1, "height": height, "width": width}


def write_quilt(folder, rows, columns=csv_table.QUILT_COLUMNS):
    """The CSV with `columns` (QUILT's by default) and a real JPEG of each row's size."""
    (folder / "frames").mkdir(exist_ok=True)
    for row in rows:
        rng = np.random.default_rng(row[""])
        pixels = rng.integers(0, 256, (row["height"], row["width"], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / row["image_path"])
    path = folder / "quilt.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


@pytest.fixture
def quilt(tmp_path):
    """36 rows, train and val interleaved (every third row is val), frames of five sizes."""
    rows = []
    for index in range(36):
        split = "val" if index % 3 == 2 else "train"
        width, height = FRAME_SIZES[index % len(FRAME_SIZES)]
        rows.append(quilt_row(index, split, width, height))
    return write_quilt(tmp_path, rows), rows


def one_line(call, *args, **kwargs):
    with pytest.raises(UsageError) as error:
        call(*args, **kwargs)
    assert "\n" not in str(error.value)
    return str(error.value)


# ----------------------------------------------------------------------------- the split

def test_csv_keeps_only_the_train_split_and_counts_the_held_out_rows(quilt):
    path, written = quilt
    rows, sizes, split_filter = data.read_csv_table(path)
    train = [row for row in written if row["split"] == "train"]
    # every train row intact, quotes, commas and newlines included
    assert list(rows) == [(row["image_path"], row["caption"]) for row in train]
    assert split_filter == {"column": "split", "value": "train", "column_present": True,
                            "rows_in_csv": 36, "rows_kept": 24}
    assert sizes.dtype == np.int32
    assert sizes.tolist() == [[row["width"], row["height"]] for row in train]
    val_rows, _, val_filter = data.read_csv_table(path, split_value="val")
    assert len(val_rows) == val_filter["rows_kept"] == 12
    assert not set(val_rows) & set(rows)
    every_row, _, all_filter = data.read_csv_table(path, split_value="all")
    assert len(every_row) == all_filter["rows_kept"] == all_filter["rows_in_csv"] == 36
    assert data.read_csv(path) == list(every_row)  # read_csv: every row, as before


def test_messages_name_the_csvs_own_row_when_a_split_is_filtered_out(quilt, tmp_path):
    path, written = quilt
    rows, _, _ = data.read_csv_table(path)
    train = [number for number, row in enumerate(written, start=1) if row["split"] == "train"]
    assert rows.numbers.tolist() == train  # kept row i is the CSV's data row numbers[i]
    last = len(rows) - 1
    paths = [*list(rows.paths)[:-1], "../outside.jpg"]
    message = one_line(csv_table.check_paths, paths, str(tmp_path), path, False, rows.numbers)
    assert f"data row {train[-1]}: " in message
    (tmp_path / rows[last][0]).unlink()  # the last train row's image goes missing
    dataset = data.CsvDataset(rows, str(tmp_path), None, 32, 12, 0.8, 0)
    assert dataset[(0, last)].message.startswith(f"data row {train[-1]} ({rows[last][0]}): ")


def test_csv_without_the_split_column_keeps_every_row_and_says_so(tmp_path):
    written = [quilt_row(index, "val", 64, 36) for index in range(5)]
    path = write_quilt(tmp_path, written, ["image_path", "caption"])
    rows, sizes, split_filter = data.read_csv_table(path)
    assert len(rows) == 5 and sizes is None
    assert split_filter["column_present"] is False and split_filter["rows_kept"] == 5


def test_a_split_key_given_that_is_not_a_column_is_an_error_not_every_row(quilt, tmp_path):
    """A typo in --csv-split-key must not train on the held-out rows; the default 'split'
    missing stays a note (every row is used, as for the demo)."""
    path, _ = quilt
    message = one_line(data.read_csv_table, path, split_key="Split")
    assert message.startswith(f"{path}: no column 'Split'; columns are ")
    assert message.endswith("Pass --csv-split-key.")
    written = [quilt_row(index, "val", 64, 36) for index in range(3)]
    no_split = write_quilt(tmp_path, written, ["image_path", "caption"])
    assert len(data.read_csv_table(no_split)[0]) == 3


def test_csv_split_value_that_no_row_has_is_refused_naming_file_column_values(quilt):
    path, _ = quilt
    message = one_line(data.read_csv_table, path, split_value="training")
    assert message.startswith(f"{path}: no row has split == 'training'")
    assert "'train', 'val'" in message and "--train-split all" in message
    message = one_line(data.read_csv_table, path, split_key="subset", split_value="train")
    assert "subset == 'train'" in message and "'youtube'" in message


def test_csv_duplicates_are_counted_among_the_kept_rows_only(tmp_path, capsys):
    written = [quilt_row(0, "train", 64, 36), quilt_row(1, "val", 64, 36)]
    written.append(dict(written[1]))  # a duplicate among the val rows only
    path = write_quilt(tmp_path, written)
    data.read_csv_table(path)
    assert "duplicate" not in capsys.readouterr().out
    data.read_csv_table(path, split_value="all")
    assert "1 duplicate rows" in capsys.readouterr().out


# ----------------------------------------------------------------------------- image sizes

def test_image_sizes_from_the_csv_columns_and_from_the_headers_agree(quilt, tmp_path):
    path, _ = quilt
    rows, sizes, _ = data.read_csv_table(path)
    from_columns = data.image_sizes(rows, str(tmp_path), sizes)
    from_headers = data.image_sizes(rows, str(tmp_path))  # 24 rows: all of them, in row order
    assert from_columns.tolist() == from_headers.tolist() == sizes.tolist()
    sample = data.image_sizes(rows, str(tmp_path), sample=5, seed=1)
    assert len(sample) == 5 and {tuple(size) for size in sample} <= set(FRAME_SIZES)
    assert sample.tolist() == data.image_sizes(rows, str(tmp_path), sample=5, seed=1).tolist()
    blank = sizes.copy()
    blank[0] = 0  # a blank width in the CSV: left out, not counted as 0 x 0
    assert len(data.image_sizes(rows, str(tmp_path), blank)) == len(rows) - 1


# ----------------------------------------------------------------------------- the crop

def fallback_crop(width, height, ratio):
    """torchvision's fixed centre crop (top, left, height, width), after ten failed tries."""
    if width / height > max(ratio):
        crop_height = height
        crop_width = int(round(height * max(ratio)))
    elif width / height < min(ratio):
        crop_width = width
        crop_height = int(round(width / min(ratio)))
    else:
        crop_width = width
        crop_height = height
    return ((height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width)


def torchvision_fallback_share(width, height, scale_min, ratio, calls=300):
    """How often RandomResizedCrop.get_params itself returns the fallback, over seeded calls.
    (A random crop equal to the fallback is possible in principle; its chance is ~1e-5.)"""
    image = Image.new("RGB", (width, height))
    fallback = fallback_crop(width, height, ratio)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        crops = [T.RandomResizedCrop.get_params(image, [scale_min, 1.0], list(ratio))
                 for _ in range(calls)]
    return sum(crop == fallback for crop in crops) / calls


@pytest.mark.parametrize("ratio", [data.RRC_RATIO, WIDE])
def test_crop_fallback_estimate_matches_torchvision_on_these_image_sizes(ratio):
    sizes = [(640, 360), (1280, 720), (1920, 1080), (480, 360), (512, 512)]
    for width, height in sizes:
        for scale_min in (0.6, 0.7, 0.8, 0.9):
            measured = torchvision_fallback_share(width, height, scale_min, ratio)
            estimate = data.crop_fallback_share([(width, height)], scale_min, ratio)
            assert abs(estimate - measured) < 0.05, (width, height, scale_min, ratio)


def test_16_9_images_at_scale_0_8_are_never_augmented_with_the_default_ratio():
    frames = [(640, 360), (1280, 720), (1920, 1080)]
    for scale_min in (0.8, 0.9):
        assert data.crop_fallback_share(frames, scale_min) == 1.0
    assert data.crop_fallback_share(frames, 0.6) < 0.5
    assert data.crop_fallback_share(frames, 0.8, WIDE) < 0.4
    assert data.crop_fallback_share([(512, 512)], 0.8) < 0.01
    mix = [(1280, 720)] * 7 + [(480, 360)] * 3  # averaged over images, not over sizes
    expected = 0.7 * 1.0 + 0.3 * data.crop_fallback_share([(480, 360)], 0.8)
    assert data.crop_fallback_share(mix, 0.8) == pytest.approx(expected)
    assert data.crop_fallback_share([], 0.8) is None


class FixedTokenizer:
    """Just enough of a tokenizer for CsvDataset: every caption is one token."""
    bos_token_id = 1
    eos_token_id = 2

    def __call__(self, texts, add_special_tokens):
        return {"input_ids": [[3] for _ in texts]}


def test_the_crop_ratio_reaches_the_crop_of_a_16_9_image(quilt, tmp_path):
    path, _ = quilt
    rows, _, _ = data.read_csv_table(path)
    frame = data.load_rgb(tmp_path / rows[0][0])
    assert frame.size == (160, 90)
    seeds = range(8)
    default = {data.train_transform(frame, 32, 0.8, seed).numpy().tobytes() for seed in seeds}
    assert len(default) == 1  # every seed: the same centre crop
    wide = {data.train_transform(frame, 32, 0.8, seed, WIDE).numpy().tobytes() for seed in seeds}
    assert len(wide) > 1
    # Through the dataset too: epochs of row 0 differ only with the wider ratio.
    for ratio, several_crops in ((data.RRC_RATIO, False), (WIDE, True)):
        dataset = data.CsvDataset(rows, str(tmp_path), FixedTokenizer(), 32, 8, 0.8, 0,
                                  rrc_ratio=ratio)
        epochs = {dataset[(epoch, 0)][0].numpy().tobytes() for epoch in range(6)}
        assert (len(epochs) > 1) == several_crops, ratio


def test_jpeg_draft_keeps_the_narrowest_crop_of_the_ratio_at_image_size():
    def draft_size(**kwargs):
        return data.CsvDataset([], "", None, 224, 77, 0.8, 0, jpeg_draft=True, **kwargs).draft_size
    assert draft_size() == 290  # 224 / sqrt(0.8 * 3/4), as before the flag
    assert draft_size(rrc_ratio=WIDE) == 334  # 224 / sqrt(0.8 * 9/16) = 333.9
    assert draft_size(rrc_ratio=(1.0, 2.0)) == 355  # the narrowest crop: 2:1, short side 1/2


# ----------------------------------------------------------------------------- memory at scale

@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PSS is read from Linux's /proc")
def test_a_forked_worker_that_reads_every_row_does_not_copy_the_table(tmp_path):
    path = bench_data.write_quilt_shaped_csv(str(tmp_path / "quilt.csv"), 200_000)
    rows, _, _ = data.read_csv_table(path)
    [(before, after)] = bench_data.epoch_in_workers(rows, workers=1)
    assert after - before < 0.05 * rows.nbytes  # measured: 0.3 MiB of a 48 MiB table
    # The measure sees a copy: the same rows as a list of tuples are copied into the worker.
    [(before, after)] = bench_data.epoch_in_workers(list(rows), workers=1)
    assert after - before > 0.5 * rows.nbytes
