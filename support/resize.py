"""`python data.py resize`: a deterministic, resumable, parallel copy of a dataset whose images
have a short side of --short-side pixels, recorded in OUT_DIR/resize.json (which the manifest
carries)."""
import argparse
import csv
import functools
import json
import multiprocessing
import os
from typing import NamedTuple

import PIL
from PIL import Image, features

from support.csv_table import leaves_root, open_columns, open_csv
from support.errors import UsageError
from support.files import atomic_write, check_output, file_sha256, write_json
from support.images import BadSampleError, load_rgb

# Fixed, so that the same source gives the same bytes (with the same Pillow and libjpeg).
JPEG_QUALITY = 95


JPEG_SUBSAMPLING = "4:4:4"  # no chroma subsampling: the stains' colours keep every pixel


def resized_name(path):
    """Where the copy of the image at `path` goes, relative to OUT_DIR: images/PATH, with '.jpg'
    added unless PATH ends in .jpg or .jpeg (so that x.png and x.jpg never share a copy)."""
    if not path.lower().endswith((".jpg", ".jpeg")):
        path += ".jpg"
    return "images/" + path


def resize_image(source, target, short_side, max_pixels):
    """Write the image at `source` to `target` as a JPEG whose shorter side is `short_side`
    (never enlarged; the aspect kept), unless `target` is there already; return its size.

    A file under its final name is whole: atomic_write renames it there when complete."""
    if os.path.exists(target):
        with Image.open(target) as done:
            return done.size
    try:
        image = load_rgb(source, max_pixels)
    except (OSError, SyntaxError, ValueError) as e:  # missing, cut short, not an image, too big
        raise BadSampleError(f"unreadable image: {e}") from None
    scale = min(1.0, short_side / min(image.size))
    size = (round(image.width * scale), round(image.height * scale))
    if size != image.size:
        image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=None)
    save = functools.partial(image.save, format="JPEG", quality=JPEG_QUALITY,
                             subsampling=JPEG_SUBSAMPLING)
    atomic_write(target, save)
    return size


class RowResizer(NamedTuple):
    """A pool worker's task: resize the image of one data row, and point the row at the copy.
    A NamedTuple, so that it pickles and travels with each chunk of rows."""
    source_csv: str
    image_root: str
    out_dir: str
    short_side: int
    max_pixels: int
    img_at: int    # the position of the image path among a row's fields
    size_at: list  # the positions of width and height, if the CSV has both columns

    def __call__(self, job):
        """(number, fields) -> (number, fields of the copy, None or what is wrong)."""
        number, fields = job
        path = fields[self.img_at]
        if leaves_root(path):
            raise UsageError(f"{self.source_csv}: data row {number}: image path {path!r} is "
                             "absolute or has '..', so its copy has no place under OUT_DIR/"
                             "images. Make the row's path relative to --image-root.")
        fields[self.img_at] = resized_name(path)
        source = os.path.join(self.image_root, path)
        target = os.path.join(self.out_dir, fields[self.img_at])
        try:
            size = resize_image(source, target, self.short_side, self.max_pixels)
        except BadSampleError as e:
            return number, fields, f"data row {number} ({path}): {e}"
        for position, pixels in zip(self.size_at, size):
            fields[position] = str(pixels)
        return number, fields, None


def check_out_dir(out_dir, image_root, csv_folder):
    """Refuse an OUT_DIR that is, holds or lies in a folder of the source: its copies could
    overwrite the originals, or mix with them."""
    out = os.path.realpath(out_dir)
    for name, folder in (("SRC_CSV's folder", csv_folder), ("--image-root", image_root)):
        folder = os.path.realpath(folder)
        if os.path.commonpath([out, folder]) in (out, folder):
            raise UsageError(f"OUT_DIR {out_dir} overlaps {name} {folder}, so the copies could "
                             "overwrite the source. Pass an OUT_DIR outside it.")


RESIZE_RECORD = "resize.json"  # in OUT_DIR, beside the CSV: how its images were made


def read_resize_record(folder):
    """The resize.json in `folder` as a dict, or None where there is none."""
    path = os.path.join(folder, RESIZE_RECORD)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def copies_written(out_dir):
    """Whether any image copy is in OUT_DIR/images (temporary files of a killed write aside)."""
    for _, _, names in os.walk(os.path.join(out_dir, "images")):
        if any(not name.rpartition(".tmp")[2].isdigit() for name in names):
            return True
    return False


def start_or_resume(out_dir, settings):
    """Start OUT_DIR with resize.json recording `settings`, or resume the resize it holds if that
    had the same settings (after deleting the temporary files a killed run left). A record under
    which no copy was written (a resize that failed at once, say on a wrong --image-root) is
    replaced: it made nothing that the corrected command could mix with."""
    record = read_resize_record(out_dir)
    if record is not None:
        differences = [f"{key} {record.get(key)!r} there, {value!r} here"
                       for key, value in settings.items() if record.get(key) != value]
        if differences and copies_written(out_dir):
            raise UsageError(f"OUT_DIR {out_dir} holds another resize: {'; '.join(differences)}. "
                             "Pass a new OUT_DIR, or delete that one.")
        if differences:
            print(f"note: OUT_DIR {out_dir} holds a resize that wrote no image "
                  f"({'; '.join(differences)}); it is replaced by this one.")
            write_json(os.path.join(out_dir, RESIZE_RECORD), settings)
        for folder, _, names in os.walk(out_dir):
            for name in names:
                if name.rpartition(".tmp")[2].isdigit():  # atomic_write's NAME.tmp<pid>
                    os.remove(os.path.join(folder, name))
    elif os.path.isdir(out_dir) and os.listdir(out_dir):
        raise UsageError(f"OUT_DIR {out_dir} is not empty and holds no resize.json. Pass a new "
                         "or empty folder.")
    else:
        write_json(os.path.join(out_dir, RESIZE_RECORD), settings)


def resize_settings(args, image_root):
    """What decides the copies' bytes, and where they come from: OUT_DIR/resize.json."""
    return {"source_csv": os.path.abspath(args.source_csv),
            "source_sha256": file_sha256(args.source_csv),
            "image_root": os.path.abspath(image_root),
            "short_side": args.short_side,
            "filter": "bicubic, reducing_gap=None",  # resize_image's: one pass of BICUBIC
            "jpeg_quality": JPEG_QUALITY,
            "jpeg_subsampling": JPEG_SUBSAMPLING,
            "pillow": PIL.__version__,
            "libjpeg": features.version("jpg"),
            "libjpeg_turbo": features.version("libjpeg_turbo")}  # None: another libjpeg


def resize_record(csv_path):
    """The resize.json that `python data.py resize` wrote next to `csv_path`, or None: how the
    images were made, and from what, for the manifest."""
    return read_resize_record(os.path.dirname(os.path.abspath(csv_path)))


def numbered_rows(reader, width):
    """(number, fields) of the CSV's data rows, numbered from 1 as messages name them: blank
    lines skipped and short rows padded with blank fields, as read_csv_table reads them."""
    number = 0
    for fields in reader:
        if fields:
            number += 1
            yield number, fields + [""] * (width - len(fields))


def resize_dataset(args):
    """`python data.py resize`: OUT_DIR/images/ gets a copy of every row's image whose shorter
    side is --short-side pixels, and OUT_DIR/<SRC_CSV's name> the source's columns and rows,
    the same but for the image path (images/PATH, '.jpg' added unless PATH is a .jpg or .jpeg)
    and, where the CSV has them, the width and height.

    Deterministic: fixed filter and JPEG settings, so the same source gives the same bytes
    whatever --workers. Resumable: every file is written under a temporary name and renamed, so
    a rerun after a kill skips the copies that are there. OUT_DIR/resize.json records the
    settings, and a rerun with others is refused. An unreadable image stops the run, naming its
    data row; with --skip-bad its row is kept, pointing at no image, and counted in resize.json
    (train.py's --bad-samples skip leaves such rows out)."""
    for flag, value in (("--short-side", args.short_side), ("--workers", args.workers)):
        if value < 1:
            raise UsageError(f"{flag} {value}: pass a number of at least 1.")
    source = args.source_csv
    csv_folder = os.path.dirname(os.path.abspath(source))
    image_root = args.image_root or csv_folder
    check_output(args.out_dir, "OUT_DIR", folder=True)  # a file, a read-only folder: refused now
    check_out_dir(args.out_dir, image_root, csv_folder)
    tally = {"rows": 0, "bad_rows": 0}
    with open_csv(source, args.csv_separator, "SRC_CSV") as reader:
        columns = open_columns(source, next(reader, []), args.csv_img_key, args.csv_caption_key)
        settings = resize_settings(args, image_root)
        start_or_resume(args.out_dir, settings)
        has_sizes = "width" in columns and "height" in columns
        size_at = [columns.index(key) for key in ("width", "height") if has_sizes]
        resizer = RowResizer(source, image_root, args.out_dir, args.short_side,
                             args.max_image_pixels, columns.index(args.csv_img_key), size_at)

        def write_rows(tmp):  # the rows stream from the reader, through the workers, to tmp
            with (open(tmp, "w", newline="", encoding="utf-8") as out,
                  multiprocessing.Pool(args.workers) as pool):
                writer = csv.writer(out, delimiter=reader.dialect.delimiter, lineterminator="\n")
                writer.writerow(columns)
                jobs = numbered_rows(reader, len(columns))
                # imap, not imap_unordered: the rows come back in the CSV's order.
                for number, fields, problem in pool.imap(resizer, jobs, chunksize=16):
                    if problem and not args.skip_bad:
                        raise UsageError(f"{source}: {problem}. Fix or remove the row, or pass "
                                         "--skip-bad to keep it, pointing at no image.")
                    if problem:
                        print(f"warning: {source}: {problem}; kept, pointing at no image")
                        tally["bad_rows"] += 1
                    writer.writerow(fields)
                    tally["rows"] = number
                    if number % 10_000 == 0:
                        print(f"{number:,} rows", flush=True)

        out_csv = os.path.join(args.out_dir, os.path.basename(source))
        atomic_write(out_csv, write_rows)
    write_json(os.path.join(args.out_dir, RESIZE_RECORD), {**settings, **tally})
    print(f"{out_csv}: {tally['rows']:,} rows ({tally['bad_rows']:,} bad), their images in "
          f"{os.path.join(args.out_dir, 'images')}. Train with --train-data {out_csv}.")


def parse_args(argv=None):
    # allow_abbrev=False: a shortened flag is an error, not whatever flag it prefixes today.
    parser = argparse.ArgumentParser(description="Tools for the training data.",
                                     allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True)
    resize = commands.add_parser(
        "resize", help="copy a dataset with every image's shorter side --short-side pixels",
        allow_abbrev=False)
    add = resize.add_argument
    add("source_csv", metavar="SRC_CSV", help="the dataset's CSV/TSV of image paths and captions")
    add("out_dir", metavar="OUT_DIR",
        help="a new folder, outside the source's: OUT_DIR/<SRC_CSV's name>, OUT_DIR/images/")
    add("--short-side", type=int, default=256,
        help="the copies' shorter side in pixels; smaller images keep their size")
    add("--image-root",
        help="folder the CSV's image paths are relative to (default: the CSV's folder)")
    add("--csv-img-key", default="image_path", help="image path column (QUILT-1M's name)")
    add("--csv-caption-key", default="caption", help="caption column")
    add("--csv-separator", help="default: tab for .tsv, comma otherwise")
    add("--workers", type=int, default=os.cpu_count() or 1,
        help="processes resizing images (default: one per core; the bytes do not depend on it)")
    add("--max-image-pixels", type=int, default=89_478_485,
        help="refuse larger images (decompression bombs)")
    add("--skip-bad", action="store_true",
        help="keep a row whose image cannot be read, pointing at no image, instead of stopping")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    resize_dataset(args)
