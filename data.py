"""Data for CLIP training: an image-caption CSV -> batches of (image, tokens), reproducibly.

What lives here: reading the CSV (QUILT-1M's layout by default) into rows that forked loader
workers share, the train and eval transforms, the tokenizer, the sampler that fixes every global
batch from (seed, epoch), and the DataLoader, whose workers hand over uint8 images that
`normalize_on_device` turns into the model's input. Not here: the model, the loss or the training
loop (train.py), the CSV's byte columns (support/csv_table.py), the reading of one image file
(support/images.py), the synthetic demo (support/demo_data.py) or the pre-resize below
(support/resize.py).

One command, run once before training on full-size frames such as QUILT-1M's: a copy of the
dataset whose images have a short side of 256 pixels (a 1280x720 frame becomes 455x256, 7.9x
fewer pixels to decode in every epoch); train on the CSV it writes.
    python data.py resize --short-side 256 quilt_1M_lookup.csv /data/quilt_256 \
        --image-root /data/quilt_1m
    python -m pytest -q tests/test_pipeline.py tests/test_quilt_data.py
"""
import array
import collections
import functools
import hashlib
import math
import os

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate

from support import resize
from support.csv_table import (Rows, StringColumn, count_duplicates, data_row, open_columns,
                               open_csv, pixel_count, release_freed_memory)
from support.errors import UsageError, run_main
from support.files import atomic_write
from support.images import BadSampleError, load_rgb, without_pils_pixel_limit
from support.pretrained import CLIP_MEAN, CLIP_STD

RRC_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's range of crop aspects (width / height)
RRC_TRIES = 10  # torchvision's tries at a random crop before its fixed fallback


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


# ----------------------------------------------------------------------------- the CSV


def read_csv(path, img_key="image_path", caption_key="caption", separator=None):
    """Every row of the CSV as a list of (image path, caption): for small files and tests. The
    separator follows the extension (.tsv tab, else comma)."""
    rows, _, _ = read_csv_table(path, img_key, caption_key, separator, split_value="all")
    return list(rows)


def read_csv_table(path, img_key="image_path", caption_key="caption", separator=None,
                   split_key=None, split_value="train", size_keys=("width", "height")):
    """(rows, sizes, split_filter): the rows to train on as Rows of (image path, caption); their
    (width, height) as an int32 array (0 where blank; None when the CSV lacks `size_keys`); and
    a dict of the filter: column, value, whether the column exists, rows in the CSV, rows kept.

    QUILT-1M's CSV holds train and val rows side by side, told apart by its `split` column. With
    that column, only rows whose value is `split_value` are kept ('all' keeps every row), so the
    held-out rows are never trained on silently; without it, every row is kept. `split_key`
    names another column, which must then exist: a typo must not train on held-out rows."""
    paths = StringColumn()
    captions = StringColumn()
    hashes = array.array("q")  # of (path, caption), to count duplicates
    sizes = array.array("i")  # width, height, width, ...: 8 bytes a row, not ~70 as ints
    numbers = array.array("i")  # of the kept rows among the CSV's data rows, from 1
    values_seen = collections.Counter()
    with open_csv(path, separator) as reader:
        columns = open_columns(path, next(reader, []), img_key, caption_key, split_key)
        split_key = split_key or "split"
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


# ----------------------------------------------------------------------------- the CSV dataset


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


def next_micro_batches(batches, accum_steps, device):
    """The next global batch's micro-batches on `device`; a bad sample stops the run. Images
    cross from the loader workers as uint8 and are normalised here, on the device."""
    micro_batches = []
    for _ in range(accum_steps):
        batch = next(batches)
        if isinstance(batch, BadSample):
            raise UsageError(batch.message)
        images, tokens = batch
        images = normalize_on_device(images, device)  # (B, 3, H, W) uint8 -> float32
        tokens = tokens.to(device, non_blocking=True)
        micro_batches.append([images, tokens])
    return micro_batches


# ----------------------------------------------------------------------------- the command

def main(argv=None):
    """`python data.py resize ...`: see support/resize.py."""
    resize.main(argv)


if __name__ == "__main__":
    run_main(main)
