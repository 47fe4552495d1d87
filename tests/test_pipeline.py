"""The input pipeline at QUILT-1M's scale: the loader workers hand over uint8 images that the
trainer's device normalises to the same bits as before, and `python data.py resize` makes a
deterministic, resumable copy of a dataset at a smaller size. Real JPEGs and CSVs in tmp_path.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_pipeline.py
"""
import csv
import hashlib
import os
import shutil
import time

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

import data
from support import resize as resize_module
from support.resize import resize_record
from support.errors import UsageError
from test_quilt_data import FixedTokenizer, quilt_row, write_quilt
from support import csv_table

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no GPU: CUDA's division by a number is the risk"))]


def old_train_transform(image, image_size, rrc_scale_min, seed):
    """data.train_transform as it was: the crop, then ToTensor and Normalize in the worker."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        params = T.RandomResizedCrop.get_params(image, [rrc_scale_min, 1.0], list(data.RRC_RATIO))
    crop = TF.resized_crop(image, *params, [image_size, image_size],
                           interpolation=T.InterpolationMode.BICUBIC, antialias=True)
    return TF.normalize(TF.to_tensor(crop), data.CLIP_MEAN, data.CLIP_STD)


def one_line(call, *args):
    with pytest.raises(UsageError) as error:
        call(*args)
    assert "\n" not in str(error.value)
    return str(error.value)


# ----------------------------------------------------------------------------- uint8 batches

@pytest.mark.parametrize("device", DEVICES)
def test_every_byte_value_normalises_on_the_device_to_torchvisions_bits(device):
    # Each channel holds all 256 values, in another order than the others.
    values = np.arange(256, dtype=np.uint8)
    pixels = np.stack([values, values[::-1], np.roll(values, 85)], axis=-1)[None]  # (1, 256, 3)
    image = Image.fromarray(pixels)
    expected = TF.normalize(TF.to_tensor(image), data.CLIP_MEAN, data.CLIP_STD)
    got = data.normalize_on_device(TF.pil_to_tensor(image)[None], torch.device(device))
    assert got.dtype == torch.float32 and got.device.type == device
    assert torch.equal(got[0].cpu(), expected)


@pytest.mark.parametrize("device", DEVICES)
def test_uint8_batches_normalised_on_the_device_equal_the_old_float_path(tmp_path, device):
    sizes = [(320, 180), (180, 320), (200, 150), (97, 61), (64, 64)]  # 16:9 both ways, odd
    rows = []
    for index, size in enumerate(sizes):
        pixels = np.random.default_rng(index).integers(0, 256, (*size[::-1], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{index}.jpg", quality=90)
        rows.append((f"{index}.jpg", f"caption {index}"))
    dataset = data.CsvDataset(rows, str(tmp_path), FixedTokenizer(), 48, 8, 0.7, seed=3)
    for epoch in range(3):
        keys = [(epoch, index) for index in range(len(rows))]
        images, _ = data.collate_pairs([dataset[key] for key in keys])
        assert images.dtype == torch.uint8 and images.shape == (len(rows), 3, 48, 48)
        new = data.normalize_on_device(images, torch.device(device)).cpu()
        old = [old_train_transform(data.load_rgb(tmp_path / path), 48, 0.7,
                                   data.sample_seed(3, epoch, index))
               for index, (path, _) in enumerate(rows)]
        assert torch.equal(new, torch.stack(old))  # bit for bit


# ----------------------------------------------------------------------------- data.py resize

FRAMES = [(1280, 720), (640, 480)]  # QUILT-1M's 16:9 video frames, and 4:3 ones


def resize(source, out_dir, *flags):
    data.main(["resize", str(source), str(out_dir), "--workers", "2", *map(str, flags)])


def read_rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def tree_sha256(folder):
    """{relative path: sha256} of every file under `folder`."""
    digests = {}
    for parent, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(parent, name)
            digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
            digests[os.path.relpath(path, folder)] = digest
    return digests


@pytest.fixture(scope="module")
def quilt(tmp_path_factory):
    """A QUILT-shaped CSV (all 13 columns) of 20 real frames, and a clean resize of it."""
    source = tmp_path_factory.mktemp("quilt")
    written = [quilt_row(index, "train", *FRAMES[index % 2]) for index in range(20)]
    csv_path = write_quilt(source, written)
    out_dir = tmp_path_factory.mktemp("copies") / "quilt_256"
    resize(csv_path, out_dir, "--short-side", 256)
    return csv_path, out_dir


def test_the_copies_have_short_side_256_and_the_csv_changes_only_path_and_size(quilt):
    csv_path, out_dir = quilt
    header, *rows = read_rows(csv_path)
    copy_header, *copies = read_rows(out_dir / "quilt.csv")
    assert copy_header == header == csv_table.QUILT_COLUMNS  # the nameless index column too
    assert len(copies) == len(rows) == 20
    changed = {header.index(key) for key in ("image_path", "width", "height")}
    for row, copy in zip(rows, copies):
        fields = dict(zip(header, copy))
        assert [v for i, v in enumerate(copy) if i not in changed] == \
            [v for i, v in enumerate(row) if i not in changed]  # captions with \n, quotes, commas
        assert fields["image_path"] == "images/" + row[header.index("image_path")]
        with Image.open(out_dir / fields["image_path"]) as image:
            width, height = image.size
        assert (str(width), str(height)) == (fields["width"], fields["height"])
        source_width = int(row[header.index("width")])
        source_height = int(row[header.index("height")])
        assert min(width, height) == 256
        assert abs(width - source_width * 256 / source_height) <= 1  # the aspect, to a pixel
    record = resize_record(out_dir / "quilt.csv")
    assert record["short_side"] == 256 and record["rows"] == 20 and record["bad_rows"] == 0
    assert record["source_sha256"] == hashlib.sha256(open(csv_path, "rb").read()).hexdigest()
    assert resize_record(csv_path) is None  # the source was not resized


def test_the_same_source_gives_the_same_bytes_whatever_the_workers(quilt, tmp_path):
    csv_path, out_dir = quilt
    data.main(["resize", str(csv_path), str(tmp_path / "again"), "--workers", "1"])
    assert tree_sha256(tmp_path / "again") == tree_sha256(out_dir)


def test_a_resize_that_failed_before_any_copy_can_be_rerun_with_corrected_flags(quilt, tmp_path):
    """A wrong --image-root stops the resize at its first row; the record it left does not
    refuse the corrected command, which makes the same bytes as a clean resize."""
    csv_path, out_dir = quilt
    target = tmp_path / "out"
    wrong = tmp_path / "nowhere"
    wrong.mkdir()
    assert "unreadable image" in one_line(resize, csv_path, target, "--image-root", wrong)
    resize(csv_path, target, "--short-side", 256)
    assert tree_sha256(target) == tree_sha256(out_dir)


def test_a_rerun_after_a_killed_run_finishes_it_with_the_same_bytes(quilt, tmp_path):
    csv_path, out_dir = quilt
    partial = tmp_path / "partial"
    shutil.copytree(out_dir, partial)
    # What a kill leaves: no CSV yet, some copies missing, a temporary file half written.
    os.remove(partial / "quilt.csv")
    for index in (3, 7, 19):
        os.remove(partial / f"images/frames/{index:03d}.jpg")
    (partial / "images/frames/003.jpg.tmp12345").write_bytes(b"half a JPEG")
    kept = os.stat(partial / "images/frames/000.jpg").st_mtime_ns
    resize(csv_path, partial)
    assert tree_sha256(partial) == tree_sha256(out_dir)
    assert os.stat(partial / "images/frames/000.jpg").st_mtime_ns == kept  # skipped, not redone


def test_the_resize_refuses_to_write_into_its_source_or_another_resize(quilt, tmp_path):
    csv_path, out_dir = quilt
    source = os.path.dirname(csv_path)
    for inside in (source, os.path.join(source, "small"), os.path.dirname(source)):
        message = one_line(resize, csv_path, inside)
        assert message.startswith(f"OUT_DIR {inside} overlaps SRC_CSV's folder")
        assert "Pass an OUT_DIR outside it." in message
    message = one_line(resize, csv_path, tmp_path / "new", "--image-root", tmp_path)
    assert "overlaps --image-root" in message
    message = one_line(resize, csv_path, out_dir, "--short-side", 128)
    assert message.startswith(f"OUT_DIR {out_dir} holds another resize: short_side 256 there, "
                              "128 here.")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert "holds no resize.json" in one_line(resize, csv_path, tmp_path / "other")
    assert not os.path.exists(os.path.join(source, "images"))


@pytest.mark.parametrize("case", ["a file", "inside a file"])
def test_a_resize_into_a_file_is_refused_before_the_csv_is_read(case, quilt, tmp_path,
                                                                 monkeypatch):
    csv_path, _ = quilt
    (tmp_path / "taken").write_text("mine")
    out_dir = tmp_path / "taken"
    if case == "inside a file":
        out_dir = out_dir / "copies"

    def no_work(*args, **kwargs):
        raise AssertionError("the resize started")
    monkeypatch.setattr(resize_module, "open_csv", no_work)
    started = time.monotonic()
    message = one_line(resize, csv_path, out_dir)
    seconds = time.monotonic() - started
    assert message.startswith(f"OUT_DIR {out_dir}: ") and "is a file, not a folder" in message
    assert seconds < 1, f"{seconds:.2f} s to refuse {out_dir}"
    assert (tmp_path / "taken").read_text() == "mine"


def test_an_unreadable_image_names_its_row_or_is_kept_and_counted_with_skip_bad(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    csv_path = write_quilt(source, [quilt_row(index, "train", 64, 48) for index in range(3)])
    (source / "frames/001.jpg").write_bytes(b"not a JPEG")
    message = one_line(resize, csv_path, tmp_path / "out", "--short-side", 32)
    assert message.startswith(f"{csv_path}: data row 2 (frames/001.jpg): unreadable image")
    assert message.endswith("or pass --skip-bad to keep it, pointing at no image.")
    resize(csv_path, tmp_path / "out", "--short-side", 32, "--skip-bad")
    assert len(read_rows(tmp_path / "out/quilt.csv")) == 4  # the header and every row
    assert not os.path.exists(tmp_path / "out/images/frames/001.jpg")
    assert resize_record(tmp_path / "out/quilt.csv")["bad_rows"] == 1


def test_an_image_path_that_leaves_the_root_is_refused_with_its_row(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    csv_path = write_quilt(source, [quilt_row(index, "train", 64, 48) for index in range(2)])
    text = open(csv_path).read()
    open(csv_path, "w").write(text.replace("frames/001.jpg", "../outside.jpg"))
    message = one_line(resize, csv_path, tmp_path / "out")
    assert message.startswith(f"{csv_path}: data row 2: image path '../outside.jpg' is absolute")
