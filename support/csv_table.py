"""A CSV of a million rows held so that forked loader workers share it: each column of strings
one numpy buffer of UTF-8 bytes (data.read_csv_table builds it), and the checks of its header and
image paths that name the file, the row and the flag."""
import array
import contextlib
import csv
import ctypes
import os

import numpy as np

from support.errors import UsageError

# A list of a million (path, caption) tuples is three million Python objects, each with a
# reference count. A DataLoader worker is a fork of the trainer, so it starts by sharing the
# trainer's pages; but reading a row through a tuple writes the tuple's and the strings' counts
# (and the garbage collector writes every tuple's header), so page after page is copied into the
# worker: after an epoch each of 8 workers x 8 GPUs holds its own copy of the table (PyTorch
# issue 13246). Here a column of strings is one numpy buffer of UTF-8 bytes and one array of
# offsets: a few objects in all, and reading a row writes nothing, so every worker keeps sharing.


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
    """(image path, caption) pairs held as two StringColumns: rows[i] is a fresh tuple.
    numbers[i] is row i's number among the CSV's data rows, which messages name: with a split
    filtered out, it is not i + 1."""

    def __init__(self, paths, captions, numbers):
        self.paths = paths
        self.captions = captions
        self.numbers = numbers

    @property
    def nbytes(self):
        return self.paths.nbytes + self.captions.nbytes

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return self.paths[index], self.captions[index]

    def __iter__(self):
        return zip(self.paths, self.captions)


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


# QUILT-1M's quilt_1M_lookup.csv: a pandas index column with an empty name, then these twelve.
# read_csv_table's defaults (image_path, caption, split, width, height) are its columns.
QUILT_COLUMNS = ["", "caption", "image_path", "subset", "split", "pathology", "roi_text",
                 "noisy_text", "corrected_text", "med_umls_ids", "magnification", "height",
                 "width"]


def pixel_count(text):
    """A width or height from the CSV ('1280' or '1280.0'); 0 when blank or not a number."""
    try:
        return max(0, min(int(float(text)), 2**31 - 1))
    except (TypeError, ValueError, OverflowError):
        return 0


def open_columns(path, columns, img_key, caption_key, split_key=None):
    """The CSV's column names (its header), once the ones we need are known to be there."""
    needed = ((img_key, "--csv-img-key"), (caption_key, "--csv-caption-key"),
              (split_key, "--csv-split-key"))
    for key, flag in needed:
        if key is not None and key not in columns:
            if len(columns) == 1:
                fix = f"{flag} or --csv-separator (only one column was found)."
            else:
                fix = f"{flag}."
            raise UsageError(f"{path}: no column '{key}'; columns are {columns}. Pass {fix}")
    return columns


@contextlib.contextmanager
def open_csv(path, separator=None, name="--train-data"):
    """A csv.reader over the CSV/TSV file at `path`, for the block; a missing or empty file is a
    UsageError naming it as `name`. The separator follows the extension: .tsv tab, else comma."""
    if not os.path.isfile(path):
        raise UsageError(f"{name} {path}: no such file.")
    if os.path.getsize(path) == 0:
        raise UsageError(f"{name} {path}: the file is empty.")
    if not separator:
        separator = "\t" if path.endswith(".tsv") else ","
    with open(path, newline="", encoding="utf-8-sig") as f:  # utf-8-sig drops a byte-order mark
        # csv.reader's lists, not DictReader's dicts: a third of the time on a million rows.
        yield csv.reader(f, delimiter=separator)


def data_row(rows, index):
    """The number, among the CSV's data rows, of rows[index] (Rows, or a plain list of pairs)."""
    numbers = getattr(rows, "numbers", None)
    if numbers is None:
        return index + 1
    return int(numbers[index])


def leaves_root(path):
    """Whether an image path may point outside the folder it is relative to: absolute, or any
    '..'. The check reads the path's text, not the file system, so a dataset folder symlinked to
    another disk works; '..' is refused anywhere, because 'slides/../x' leaves the root when
    slides is such a symlink."""
    return os.path.isabs(path) or ".." in path.replace("\\", "/").split("/")


def check_paths(paths, image_root, csv_path, allow_absolute, numbers=None):
    """Refuse image paths that may leave --image-root: a CSV is data, not a key."""
    if allow_absolute:
        return
    for index, path in enumerate(paths):
        if leaves_root(path):
            number = index + 1 if numbers is None else numbers[index]
            raise UsageError(f"{csv_path}: data row {number}: image path {path!r} may point "
                             f"outside --image-root {image_root}. Fix the row, or pass "
                             "--allow-absolute-paths if you trust the CSV.")
