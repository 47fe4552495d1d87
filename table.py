"""The training CSV as columns of bytes: a million rows that forked loader workers share.

A list of a million (path, caption) tuples is three million Python objects, each with a
reference count. A DataLoader worker is a fork of the trainer, so it starts by sharing the
trainer's pages; but reading a row through a tuple writes the tuple's and the strings' counts
(and the garbage collector writes every tuple's header), so page after page is copied into the
worker: after an epoch each of 8 workers x 8 GPUs holds its own copy of the table (PyTorch issue
13246). Here a column of strings is one numpy buffer of UTF-8 bytes and one array of offsets: a
few objects in all, and reading a row writes nothing, so every worker keeps sharing them.

QUILT-1M's layout (its `split` column, `width` and `height`) is the default; data.py builds the
dataset on top of these rows.

    python -m pytest -q tests/test_quilt_data.py -k "csv or worker"
"""
import array
import collections
import csv
import ctypes
import os

import numpy as np

from plumbing import UsageError


# ----------------------------------------------------------------------------- columns of strings

class StringColumn:
    """Strings in one uint8 buffer of their UTF-8 bytes, string i being
    buffer[offsets[i]:offsets[i + 1]]. Built by `append`, then `freeze` moves it into numpy."""

    def __init__(self):
        self.buffer = bytearray()
        self.offsets = array.array("q", [0])

    def append(self, text):
        self.buffer += text.encode("utf-8")
        self.offsets.append(len(self.buffer))

    def freeze(self):
        """Views of the bytes built so far as numpy arrays (no copy: the peak stays one table)."""
        self.buffer = np.frombuffer(self.buffer, dtype=np.uint8)
        self.offsets = np.frombuffer(self.offsets, dtype=np.int64)
        return self

    @property
    def nbytes(self):
        return len(self.buffer) + 8 * len(self.offsets)

    def __len__(self):
        return len(self.offsets) - 1

    def __getitem__(self, index):
        index = range(len(self))[index]  # negative indices count from the end, as in a list
        start = self.offsets[index]
        end = self.offsets[index + 1]
        # A new str each time: nothing of the column is written, so its pages stay shared.
        return bytes(self.buffer[start:end]).decode("utf-8")

    def __iter__(self):
        for index in range(len(self)):
            yield self[index]


class Rows:
    """(image path, caption) pairs held as two StringColumns: rows[i] is a fresh tuple."""

    def __init__(self, paths, captions):
        self.paths = paths
        self.captions = captions

    @property
    def nbytes(self):
        return self.paths.nbytes + self.captions.nbytes

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return self.paths[index], self.captions[index]

    def __iter__(self):
        for index in range(len(self)):
            yield self[index]


def count_duplicates(hashes):
    """Rows whose (path, caption) hash another row has: no set of a million tuples needed.

    Python's hash of a str is salted per process, which is fine for a count made in one. Two
    different pairs share a 64-bit hash with a chance of about 3e-8 among a million rows."""
    return len(hashes) - len(np.unique(np.frombuffer(hashes, dtype=np.int64)))


def release_freed_memory():
    """Hand the memory that reading freed back to the kernel (glibc only; elsewhere nothing).

    The columns grow by reallocation, leaving holes in the heap as large as the table; they stay
    resident, and a forked worker's first allocations land in them and copy those pages. glibc's
    malloc_trim(0) returns every free page of the heap, holes included."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # no libc.so.6, or one without malloc_trim
        pass


# ----------------------------------------------------------------------------- the CSV

def read_csv(path, img_key="image_path", caption_key="caption", separator=None):
    """Every row of the CSV as a list of (image path, caption): for small files and tests. The
    separator follows the extension (.tsv tab, else comma)."""
    rows, _, _ = read_csv_table(path, img_key, caption_key, separator, split_value="all")
    return list(rows)


def pixel_count(text):
    """A width or height from the CSV ('1280' or '1280.0'); 0 when blank or not a number."""
    try:
        return max(0, min(int(float(text)), 2**31 - 1))
    except (TypeError, ValueError, OverflowError):
        return 0


def open_columns(path, header, img_key, caption_key):
    """The CSV's column names (its header), once the two we need are known to be there."""
    columns = header
    for key, flag in ((img_key, "--csv-img-key"), (caption_key, "--csv-caption-key")):
        if key not in columns:
            if len(columns) == 1:
                fix = f"{flag} or --csv-separator (only one column was found)."
            else:
                fix = f"{flag}."
            raise UsageError(f"{path}: no column '{key}'; columns are {columns}. Pass {fix}")
    return columns


def read_csv_table(path, img_key="image_path", caption_key="caption", separator=None,
                   split_key="split", split_value="train", size_keys=("width", "height")):
    """(rows, sizes, split_filter): the rows to train on as Rows of (image path, caption); their
    (width, height) as an int32 array (0 where blank; None when the CSV lacks `size_keys`); and
    a dict of the filter: column, value, whether the column exists, rows in the CSV, rows kept.

    QUILT-1M's CSV holds train and val rows side by side, told apart by its `split` column. With
    that column, only rows whose value is `split_value` are kept ('all' keeps every row), so the
    held-out rows are never trained on silently; without it, every row is kept."""
    if not os.path.isfile(path):
        raise UsageError(f"--train-data {path}: no such file.")
    if os.path.getsize(path) == 0:
        raise UsageError(f"--train-data {path}: the file is empty.")
    if not separator:
        separator = "\t" if path.endswith(".tsv") else ","
    paths = StringColumn()
    captions = StringColumn()
    hashes = array.array("q")  # of (path, caption), to count duplicates
    sizes = array.array("i")  # width, height, width, ...: 8 bytes a row, not ~70 as ints
    values_seen = collections.Counter()
    with open(path, newline="", encoding="utf-8-sig") as f:  # utf-8-sig drops a byte-order mark
        # csv.reader's lists, not DictReader's dicts: a third of the time on a million rows.
        reader = csv.reader(f, delimiter=separator)
        columns = open_columns(path, next(reader, []), img_key, caption_key)
        # A row's fields by position; the split's is the padding "" without the column.
        img_at = columns.index(img_key)
        caption_at = columns.index(caption_key)
        split_at = columns.index(split_key) if split_key in columns else len(columns)
        has_sizes = all(key in columns for key in size_keys)
        size_at = [columns.index(key) for key in size_keys if has_sizes]
        padding = [""] * (len(columns) + 1)
        for row in reader:
            if not row:
                continue  # a blank line, which DictReader skipped too
            row += padding[len(row):]  # a short row's missing fields are blank
            value = row[split_at]
            values_seen[value] += 1
            if value == split_value or split_value == "all" or split_at == len(columns):
                paths.append(row[img_at])
                captions.append(row[caption_at])
                hashes.append(hash((row[img_at], row[caption_at])))
                for position in size_at:
                    sizes.append(pixel_count(row[position]))
    rows_in_csv = sum(values_seen.values())
    if not rows_in_csv:
        raise UsageError(f"{path}: the CSV has a header but no rows.")
    if not len(paths):
        held = ", ".join(repr(value) for value in sorted(values_seen)[:10])
        raise UsageError(f"{path}: no row has {split_key} == {split_value!r}; the column holds "
                         f"{held}. Pass --train-split VALUE or --train-split all.")
    duplicates = count_duplicates(hashes)
    if duplicates:
        print(f"warning: {path}: {duplicates} duplicate rows (same image and caption); kept.")
    rows = Rows(paths.freeze(), captions.freeze())
    has_split = split_at < len(columns)
    split_filter = {"column": split_key, "value": split_value, "column_present": has_split,
                    "rows_in_csv": rows_in_csv, "rows_kept": len(rows)}
    release_freed_memory()
    size_array = None
    if has_sizes:
        size_array = np.frombuffer(sizes, dtype=np.int32).reshape(-1, 2)
    return rows, size_array, split_filter


def check_paths(paths, image_root, csv_path, allow_absolute):
    """Refuse image paths that may leave --image-root (absolute, or any '..'): a CSV is data,
    not a key. The check reads the path's text, not the file system, so a dataset folder
    symlinked to another disk works; '..' is refused anywhere, because 'slides/../x' leaves the
    root when slides is such a symlink."""
    if allow_absolute:
        return
    for number, path in enumerate(paths, start=1):
        if os.path.isabs(path) or ".." in path.replace("\\", "/").split("/"):
            raise UsageError(f"{csv_path}: data row {number}: image path {path!r} may point "
                             f"outside --image-root {image_root}. Fix the row, or pass "
                             "--allow-absolute-paths if you trust the CSV.")
