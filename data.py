"""Data for CLIP training: an image-caption CSV -> batches of (image, tokens), reproducibly.

What lives here: reading the CSV (QUILT-1M's layout by default) into rows that forked loader
workers share, the train and eval transforms, the tokenizer, the sampler that fixes every global
batch from (seed, epoch), and the DataLoader, whose workers hand over uint8 images that
`normalize_on_device` turns into the model's input. Not here: the model, the loss or the training
loop (train.py), and the synthetic demo dataset (`python demo_data.py`).

One command, run once before training on full-size frames such as QUILT-1M's: a copy of the
dataset whose images have a short side of 256 pixels (a 1280x720 frame becomes 455x256, 7.9x
fewer pixels to decode in every epoch); train on the CSV it writes.
    python data.py resize --short-side 256 quilt_1M_lookup.csv /data/quilt_256 \
        --image-root /data/quilt_1m
    python -m pytest -q tests/test_pipeline.py tests/test_quilt_data.py
"""
import argparse
import array
import collections
import contextlib
import csv
import ctypes
import functools
import hashlib
import json
import math
import multiprocessing
import os
from typing import NamedTuple

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
import PIL
from PIL import Image, features
from torch.utils.data import DataLoader, Dataset, default_collate

from model import CLIP_MEAN, CLIP_STD
from plumbing import UsageError, atomic_write, file_sha256, run_main, write_json

RRC_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's range of crop aspects (width / height)
RRC_TRIES = 10  # torchvision's tries at a random crop before its fixed fallback


# ----------------------------------------------------------------------------- images

@contextlib.contextmanager
def without_pils_pixel_limit():
    """Inside the block, PIL's own decompression-bomb check is off; outside, it is as it was.

    PIL keeps one limit for the whole process (Image.MAX_IMAGE_PIXELS): it warns about larger
    images and refuses those over twice the limit, when it opens a file and when it crops. We
    refuse too-large images ourselves, with our own limit (--max-image-pixels, which may be above
    PIL's), so PIL's check is lifted only around our own reading and cropping, and put back after.
    (Not thread-safe: images are read by DataLoader worker processes or by the main thread.)"""
    pils_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = pils_limit


def load_rgb(path, max_pixels=Image.MAX_IMAGE_PIXELS, draft_size=None):
    """Any readable image as 8-bit RGB: grayscale, palette, RGBA (over white), CMYK, 16-bit.

    Decoding happens here, so a truncated file fails here. Images over `max_pixels` are refused
    from their header, before decoding: a decompression bomb would otherwise fill the memory.
    With `draft_size`, a JPEG is decoded at 1/2, 1/4 or 1/8 scale in the DCT domain, as long as
    both sides stay >= draft_size: several times faster for large images, and other pixels than a
    full decode (hence a flag)."""
    with without_pils_pixel_limit(), Image.open(path) as image:
        if image.width * image.height > max_pixels:
            size = f"{image.width}x{image.height}"
            raise ValueError(f"{size} pixels is over --max-image-pixels {max_pixels}")
        if draft_size and image.format == "JPEG":
            image.draft("RGB", (draft_size, draft_size))
        image.load()
        if image.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit gray: keep the high byte
            high_byte = np.asarray(image).astype(np.uint32) >> 8  # (dividing, not clipping)
            image = Image.fromarray(high_byte.astype(np.uint8))
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            white = Image.new("RGBA", image.size, "white")
            return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
        return image.convert("RGB")


# ----------------------------------------------------------------------------- transforms

def sample_seed(seed, epoch, index):
    """One integer per (run seed, epoch, sample) that decides that sample's augmentation."""
    # RULE 2: a hash of the sample's own coordinates, never the worker that loads it.
    digest = hashlib.sha256(f"{seed}/{epoch}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def train_transform(image, image_size, rrc_scale_min, seed, rrc_ratio=RRC_RATIO):
    """RandomResizedCrop(scale=(rrc_scale_min, 1), ratio=rrc_ratio) of a PIL image, as a uint8
    tensor (3, image_size, image_size); its randomness fixed by `seed`: the same seed gives the
    same crop in any process. normalize_on_device makes it the model's input."""
    # RULE 2: the crop is decided by the sample's seed alone, so --workers cannot change a result.
    with torch.random.fork_rng(devices=[]):  # torchvision's sampling, with our own seed
        # The CPU generator only: torch.manual_seed, which seeds every device, costs 20x more.
        torch.default_generator.manual_seed(seed)
        # RULE 5: the lower crop scale, 0.8 by default (--rrc-scale) — see RULES.md.
        scale = [rrc_scale_min, 1.0]
        ratio = list(rrc_ratio)
        top, left, height, width = T.RandomResizedCrop.get_params(image, scale, ratio)
    # The image passed our own size check when it was read; PIL would check the crop with its own.
    with without_pils_pixel_limit():
        image = TF.resized_crop(image, top, left, height, width, [image_size, image_size],
                                interpolation=T.InterpolationMode.BICUBIC, antialias=True)
    # uint8, not float32: a quarter of the bytes from the workers to the trainer and the GPU.
    return TF.pil_to_tensor(image)


@functools.cache
def normalization_constants(device):
    """255, CLIP's mean and its std as float32 tensors on `device`, the last two (3, 1, 1).
    Made once per device: a blocking copy to a GPU would wait for all the work queued there."""
    byte_max = torch.tensor(255.0, device=device)
    mean = torch.tensor(CLIP_MEAN, device=device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, device=device).view(3, 1, 1)
    return byte_max, mean, std


def normalize_on_device(images, device):
    """A uint8 batch (B, 3, H, W) from the loader -> the model's float32 input on `device`.

    Bit-identical to torchvision's ToTensor and Normalize in the loader workers: the same
    operations in the same order, `.float().div(255)` then `.sub_(mean).div_(std)`. One
    difference would creep in on a GPU: CUDA divides by a Python number as a multiplication by
    its reciprocal, which rounds 126 of the 256 byte values differently; dividing by a tensor on
    the device divides exactly, as the CPU does."""
    byte_max, mean, std = normalization_constants(device)
    images = images.to(device, non_blocking=True)
    return images.float().div(byte_max).sub_(mean).div_(std)


def crop_fit_probability(width, height, scale_min, ratio=RRC_RATIO, points=4096):
    """The chance that one try of RandomResizedCrop fits inside a width x height image.

    A try draws s ~ U(scale_min, 1) and x ~ U(log lo, log hi): a crop round(sqrt(A s e^x)) wide,
    round(sqrt(A s e^-x)) high (A = width * height). It fits when s is under both bounds below:
    exactly for each x; the mean over x is a midpoint sum."""
    area = width * height
    log_lo, log_hi = np.log(ratio)
    x = log_lo + (np.arange(points) + 0.5) / points * (log_hi - log_lo)
    widest = (width + 0.5) ** 2 / (area * np.exp(x))  # w <= width
    tallest = (height + 0.5) ** 2 * np.exp(x) / area  # h <= height
    s_max = np.minimum(widest, tallest)
    if scale_min >= 1:  # s is always 1
        return float(np.mean(s_max > 1))
    return float(np.clip((s_max - scale_min) / (1 - scale_min), 0, 1).mean())


def crop_fallback_share(sizes, scale_min, ratio=RRC_RATIO):
    """The expected share of RandomResizedCrop's crops that are its fixed fallback over images
    of these (width, height) sizes (None for none): after RRC_TRIES tries that do not fit, it
    takes the same centre crop in every epoch, for every seed. A crop of area fraction s and
    aspect r fits an image of aspect a only if s <= r / a and s <= a / r: a 16:9 video frame
    with r <= 4/3 needs s <= 0.75, so at --rrc-scale 0.8 every crop is the fallback."""
    sizes = np.asarray(sizes).reshape(-1, 2)
    if len(sizes) == 0:
        return None
    unique, counts = np.unique(sizes, axis=0, return_counts=True)
    shares = [(1 - crop_fit_probability(width, height, scale_min, ratio)) ** RRC_TRIES
              for width, height in unique.tolist()]
    return float(np.dot(shares, counts) / counts.sum())


def image_sizes(rows, image_root, csv_sizes=None, sample=200, seed=0):
    """(width, height) of the training images as an (N, 2) array: every row's from the CSV's
    columns when it has them (QUILT-1M's width and height), else read from the headers of a
    seeded sample of at most `sample` images (PIL reads the header only, no pixels)."""
    if csv_sizes is not None:
        known = csv_sizes[(csv_sizes > 0).all(axis=1)]  # 0: blank in the CSV
        if len(known):
            return known
    # Its own generator: the global ones decide the model and the crops.
    picked = np.random.default_rng(seed).choice(len(rows), min(sample, len(rows)), replace=False)
    sizes = []
    for index in sorted(picked.tolist()):
        path = os.path.join(image_root, rows[index][0])
        try:
            with without_pils_pixel_limit(), Image.open(path) as image:
                sizes.append(image.size)
        except (OSError, SyntaxError, ValueError):
            continue  # an unreadable image is --check-data's business, not this estimate's
    return np.array(sizes, dtype=np.int32).reshape(-1, 2)


def eval_transform(image_size):
    """Resize the shortest side, center-crop, normalise: no randomness at evaluation."""
    return T.Compose([
        T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(image_size),
        T.ToTensor(),
        T.Normalize(CLIP_MEAN, CLIP_STD),
    ])


# ----------------------------------------------------------------------------- tokenizer

SOT = "<|startoftext|>"
EOT = "<|endoftext|>"


def train_tokenizer(captions, out_dir, vocab_size):
    """Train a byte-level BPE on the captions (deterministic, offline), save it as a HF folder.

    Start- and end-of-text are added after training, so end-of-text gets the largest id, as in
    OpenAI CLIP's vocabulary: the text encoder pools there with argmax."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    bpe = Tokenizer(models.BPE())
    # CLIP lowercases its captions.
    bpe.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(sorted(set(captions)), trainer)
    bpe.add_special_tokens([SOT, EOT])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=SOT, eos_token=EOT)
    atomic_write(out_dir, tokenizer.save_pretrained)


def load_tokenizer(folder):
    """A local Hugging Face tokenizer folder: ours, or a saved CLIP one (vocab.json, merges.txt)."""
    from transformers import AutoTokenizer, CLIPTokenizer
    if not os.path.isdir(folder):
        raise UsageError(f"--tokenizer {folder}: not a folder. "
                         "Pass a local Hugging Face tokenizer folder.")
    # OpenAI's vocab.json + merges.txt alone name no tokenizer class: they are CLIP's.
    has_merges = os.path.exists(os.path.join(folder, "merges.txt"))
    has_config = os.path.exists(os.path.join(folder, "tokenizer_config.json"))
    tokenizer_class = CLIPTokenizer if has_merges and not has_config else AutoTokenizer
    tokenizer = tokenizer_class.from_pretrained(folder, local_files_only=True)
    if tokenizer.eos_token_id != len(tokenizer) - 1 or tokenizer.bos_token_id is None:
        raise UsageError(f"--tokenizer {folder}: end-of-text must be the last id of the "
                         "vocabulary and a start-of-text token must exist (CLIP pools at argmax "
                         "of the token ids).")
    return tokenizer


def tokenizer_fingerprint(tokenizer):
    """sha256 of the tokenizer's full serialised state: vocabulary, merges, normaliser."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


def tokenize(tokenizer, texts, context_length):
    """[SOT] + tokens + [EOT], cut to context_length and padded with 0, as in OpenAI CLIP."""
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    tokens = torch.zeros(len(ids), context_length, dtype=torch.long)
    for row, seq in enumerate(ids):
        seq = [tokenizer.bos_token_id] + seq[:context_length - 2] + [tokenizer.eos_token_id]
        tokens[row, :len(seq)] = torch.tensor(seq)
    return tokens


# ----------------------------------------------------------------------------- the CSV as bytes

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


# ----------------------------------------------------------------------------- the CSV

# QUILT-1M's quilt_1M_lookup.csv: a pandas index column with an empty name, then these twelve.
# read_csv_table's defaults (image_path, caption, split, width, height) are its columns.
QUILT_COLUMNS = ["", "caption", "image_path", "subset", "split", "pathology", "roi_text",
                 "noisy_text", "corrected_text", "med_umls_ids", "magnification", "height",
                 "width"]


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


def open_columns(path, columns, img_key, caption_key):
    """The CSV's column names (its header), once the two we need are known to be there."""
    for key, flag in ((img_key, "--csv-img-key"), (caption_key, "--csv-caption-key")):
        if key not in columns:
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


def read_csv_table(path, img_key="image_path", caption_key="caption", separator=None,
                   split_key="split", split_value="train", size_keys=("width", "height")):
    """(rows, sizes, split_filter): the rows to train on as Rows of (image path, caption); their
    (width, height) as an int32 array (0 where blank; None when the CSV lacks `size_keys`); and
    a dict of the filter: column, value, whether the column exists, rows in the CSV, rows kept.

    QUILT-1M's CSV holds train and val rows side by side, told apart by its `split` column. With
    that column, only rows whose value is `split_value` are kept ('all' keeps every row), so the
    held-out rows are never trained on silently; without it, every row is kept."""
    paths = StringColumn()
    captions = StringColumn()
    hashes = array.array("q")  # of (path, caption), to count duplicates
    sizes = array.array("i")  # width, height, width, ...: 8 bytes a row, not ~70 as ints
    numbers = array.array("i")  # of the kept rows among the CSV's data rows, from 1
    values_seen = collections.Counter()
    with open_csv(path, separator) as reader:
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
                numbers.append(sum(values_seen.values()))
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
    rows = Rows(paths.freeze(), captions.freeze(), np.frombuffer(numbers, dtype=np.int32))
    has_split = split_at < len(columns)
    split_filter = {"column": split_key, "value": split_value, "column_present": has_split,
                    "rows_in_csv": rows_in_csv, "rows_kept": len(rows)}
    release_freed_memory()
    size_array = None
    if has_sizes:
        size_array = np.frombuffer(sizes, dtype=np.int32).reshape(-1, 2)
    return rows, size_array, split_filter


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


# ----------------------------------------------------------------------------- the CSV dataset

class BadSampleError(Exception):
    """An image or caption that cannot be used."""


class BadSample:
    """What the training dataset returns for a pair it cannot use; the trainer raises it."""

    def __init__(self, message):
        self.message = message


def collate_pairs(samples):
    """Stack (image, tokens) pairs into a batch; a batch with a BadSample becomes that one."""
    bad = [sample for sample in samples if isinstance(sample, BadSample)]
    return bad[0] if bad else default_collate(samples)


def load_sample(path, caption, max_pixels, draft_size=None):
    """The image of a pair as RGB, or BadSampleError saying what is wrong with the pair."""
    if not caption.strip():
        raise BadSampleError("empty caption")
    try:
        return load_rgb(path, max_pixels, draft_size)
    except (OSError, SyntaxError, ValueError) as e:  # missing, cut short, not an image, too big
        raise BadSampleError(f"unreadable image: {e}") from None


class SampleCheck(Dataset):
    """What is wrong with row i (its image or caption), or None: --check-data's item, read in
    the loader's worker processes straight from the shared rows."""

    def __init__(self, rows, image_root, max_pixels):
        self.rows = rows
        self.image_root = image_root
        self.max_pixels = max_pixels

    def __getitem__(self, index):
        path, caption = self.rows[index]
        try:
            load_sample(os.path.join(self.image_root, path), caption, self.max_pixels)
        except BadSampleError as e:
            return str(e)


def find_bad_samples(rows, indices, image_root, workers, max_pixels):
    """The --check-data pass over rows[indices]: read each image once, in parallel.
    Returns {row index: reason}."""
    checks = SampleCheck(rows, image_root, max_pixels)
    # Its own generator, not the global one: that one seeds the model.
    problems = DataLoader(checks, batch_size=None, sampler=indices, num_workers=workers,
                          generator=torch.Generator())
    return {index: reason for index, reason in zip(indices, problems) if reason}


class CsvDataset(Dataset):
    """Indexed by (epoch, sample index), so each sample's augmentation is a function of both."""

    def __init__(self, rows, image_root, tokenizer, image_size, context_length, rrc_scale_min,
                 seed, max_pixels=Image.MAX_IMAGE_PIXELS, jpeg_draft=False, rrc_ratio=RRC_RATIO):
        self.rows = rows
        self.image_root = image_root
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.context_length = context_length
        self.rrc_scale_min = rrc_scale_min
        self.rrc_ratio = rrc_ratio
        self.seed = seed
        self.max_pixels = max_pixels
        self.draft_size = None
        if jpeg_draft:
            # Decode just large enough that the smallest crop RandomResizedCrop can take still
            # has image_size pixels on its short side (never enlarged): area rrc_scale_min and
            # aspect r have a short side sqrt(area * min(r, 1/r)), smallest at this r.
            narrowest = min(rrc_ratio[0], 1 / rrc_ratio[1])
            self.draft_size = math.ceil(image_size / math.sqrt(rrc_scale_min * narrowest))

    def __getitem__(self, key):
        epoch, index = key
        path, caption = self.rows[index]
        full_path = os.path.join(self.image_root, path)
        try:
            image = load_sample(full_path, caption, self.max_pixels, self.draft_size)
        except BadSampleError as e:
            # Handed back as data: an exception raised in a worker process reaches the trainer
            # only as the text of a traceback.
            return BadSample(f"data row {data_row(self.rows, index)} ({path}): {e}. Fix or "
                             "remove the row, or pass --bad-samples skip to leave out every bad "
                             "row, decided before training.")
        seed = sample_seed(self.seed, epoch, index)
        image = train_transform(image, self.image_size, self.rrc_scale_min, seed, self.rrc_ratio)
        return image, tokenize(self.tokenizer, [caption], self.context_length)[0]


class GlobalBatchSampler:
    """Yields, for every optimizer step from `start_step` on, this rank's micro-batches of
    (epoch, index).

    One global batch regardless of hardware: the dataset is permuted once per epoch from
    (seed, epoch); step s of the epoch takes the next `global_batch` samples of that permutation,
    cut into world_size * accum_steps micro-batches of which rank r holds r*K .. r*K+K-1
    (K = accum_steps): one subtree of train.TreeSum's tree. So 1 process x 16, 2 processes x 8
    and 1 process x 2 accumulation steps x 8 see the same rows in the same order every step.
    The position is just the step number, so resuming needs no sampler state. `samples`: the
    usable row indices, all rows or those left after --bad-samples skip."""

    def __init__(self, samples, batch_size, world_size, rank, accum_steps, seed, total_steps,
                 start_step=0):
        self.samples = np.asarray(samples, dtype=np.int64)  # not a million Python ints
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.accum_steps = accum_steps
        self.seed = seed
        self.total_steps = total_steps
        self.start_step = start_step
        self.global_batch = batch_size * world_size * accum_steps
        # drop_last: every step is a full global batch.
        self.steps_per_epoch = len(self.samples) // self.global_batch

    def epoch_order(self, epoch):
        """The samples in the order of `epoch` (an array): a function of (seed, epoch) alone."""
        # RULE 3: the same permutation on every rank and any world size — see RULES.md.
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(len(self.samples), generator=generator).numpy()
        return self.samples[order]

    def __iter__(self):
        for step in range(self.start_step, self.total_steps):
            epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
            if step == self.start_step or step_in_epoch == 0:
                permutation = self.epoch_order(epoch)
            # RULE 3: step s takes the s-th global batch of the permutation; rank r takes its
            # micro-batches r*K .. r*K+K-1, so no hardware changes the batch or its order.
            first = step_in_epoch * self.global_batch
            batch = permutation[first:first + self.global_batch].tolist()
            for micro in range(self.accum_steps):
                start = (self.rank * self.accum_steps + micro) * self.batch_size
                yield [(epoch, index) for index in batch[start:start + self.batch_size]]

    def __len__(self):
        return (self.total_steps - self.start_step) * self.accum_steps


def make_train_loader(dataset, sampler, workers, seed, pin_memory):
    """The DataLoader over `dataset` in the sampler's batches, `workers` processes reading."""
    prefetch_factor = 4 if workers > 0 else None  # DataLoader refuses one without workers
    # RULE 1: the loader's generator is seeded too. It only seeds the worker processes; the
    # augmentation is already fixed per sample (RULE 2), so this is belt and braces.
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                      persistent_workers=workers > 0, prefetch_factor=prefetch_factor,
                      collate_fn=collate_pairs, generator=generator)


# ----------------------------------------------------------------------------- resizing, once

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


def start_or_resume(out_dir, settings):
    """Start OUT_DIR with resize.json recording `settings`, or resume the resize it holds if that
    had the same settings (after deleting the temporary files a killed run left)."""
    record = read_resize_record(out_dir)
    if record is not None:
        differences = [f"{key} {record.get(key)!r} there, {value!r} here"
                       for key, value in settings.items() if record.get(key) != value]
        if differences:
            raise UsageError(f"OUT_DIR {out_dir} holds another resize: {'; '.join(differences)}. "
                             "Pass a new OUT_DIR, or delete that one.")
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
    parser = argparse.ArgumentParser(description="Tools for the training data.")
    commands = parser.add_subparsers(dest="command", required=True)
    resize = commands.add_parser(
        "resize", help="copy a dataset with every image's shorter side --short-side pixels")
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


if __name__ == "__main__":
    run_main(main)
