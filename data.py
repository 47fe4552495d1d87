"""Data for CLIP training: captions CSV -> (image, tokens) batches, reproducibly; plus the demo dataset.

What lives here: reading an image-caption CSV (QUILT-1M's layout by default), the train and eval transforms,
the tokenizer, the sampler that fixes every global batch from (seed, epoch), the DataLoader, and a generator
of synthetic H&E-like tiles so that everything runs offline out of the box. It does not train or evaluate.

    python data.py            # writes the demo dataset into data/demo and prints where
"""
import contextlib
import csv
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded: tokenizers come from local folders

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import DataLoader, Dataset

REPO_DIR = os.path.dirname(os.path.abspath(__file__))
DEMO_DIR = os.path.join(REPO_DIR, "data", "demo")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # the statistics OpenAI CLIP normalised with
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ----------------------------------------------------------------------------- transforms

def sample_seed(seed, epoch, index):
    """One integer per (run seed, epoch, sample) that decides that sample's augmentation."""
    digest = hashlib.sha256(f"{seed}/{epoch}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def train_transform(image, image_size, rrc_scale_min, seed):
    """RandomResizedCrop(scale=(rrc_scale_min, 1)) + CLIP normalisation, its randomness fixed by `seed`.

    RULE 2: augmentation randomness comes from (seed, epoch, sample index), never from which worker
    process happens to load the sample, so --workers cannot change a result.
    RULE 5: the lower crop scale defaults to 0.8; the study found 0.7-0.8 beat 0.6 and 0.9.
    """
    with torch.random.fork_rng(devices=[]):  # use torchvision's sampling, but with our own seed
        torch.default_generator.manual_seed(seed)  # the CPU generator only: torch.manual_seed costs 20x more
        top, left, height, width = T.RandomResizedCrop.get_params(image, [rrc_scale_min, 1.0], [3 / 4, 4 / 3])
    image = TF.resized_crop(image, top, left, height, width, [image_size, image_size],
                            interpolation=T.InterpolationMode.BICUBIC, antialias=True)
    return TF.normalize(TF.to_tensor(image), CLIP_MEAN, CLIP_STD)


def eval_transform(image_size):
    """Resize the shortest side, center-crop, normalise: no randomness at evaluation."""
    return T.Compose([T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(image_size),
                      T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])


def load_rgb(path, max_pixels=Image.MAX_IMAGE_PIXELS, draft_size=None):
    """Any readable image as 8-bit RGB: grayscale, palette, RGBA (over white), CMYK, 16-bit.

    Decoding happens here, so a truncated file fails here; images over `max_pixels` are refused before decoding
    (a decompression bomb would otherwise fill the memory). With `draft_size`, a JPEG is decoded at 1/2, 1/4 or
    1/8 scale in the DCT domain, as long as both sides stay >= draft_size: several times faster for large images,
    and other pixels than a full decode (hence a flag)."""
    Image.MAX_IMAGE_PIXELS = None  # our own check below replaces PIL's, with our limit
    with Image.open(path) as image:
        if image.width * image.height > max_pixels:
            raise ValueError(f"{image.width}x{image.height} pixels is over --max-image-pixels {max_pixels}")
        if draft_size and image.format == "JPEG":
            image.draft("RGB", (draft_size, draft_size))
        image.load()
        if image.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit gray: keep the high byte, don't clip
            image = Image.fromarray((np.asarray(image).astype(np.uint32) >> 8).astype(np.uint8))
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            return Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA")).convert("RGB")
        return image.convert("RGB")


# ----------------------------------------------------------------------------- tokenizer

SOT, EOT = "<|startoftext|>", "<|endoftext|>"


def train_tokenizer(captions, out_dir, vocab_size):
    """Train a byte-level BPE on the captions (deterministic, offline) and save it as a HF folder. Start- and
    end-of-text are added after training, so end-of-text gets the largest id, as in OpenAI CLIP's vocabulary:
    the text encoder pools there with argmax."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])  # CLIP lowercases
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(sorted(set(captions)), trainer)
    bpe.add_special_tokens([SOT, EOT])
    atomic_write(out_dir, PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=SOT, eos_token=EOT).save_pretrained)


def load_tokenizer(folder):
    """A local Hugging Face tokenizer folder: ours, or a saved CLIP tokenizer (vocab.json + merges.txt)."""
    from transformers import AutoTokenizer, CLIPTokenizer
    if not os.path.isdir(folder):
        raise SystemExit(f"--tokenizer {folder}: not a folder. Pass a local Hugging Face tokenizer folder.")
    # OpenAI's vocab.json + merges.txt alone name no tokenizer class: they are CLIP's.
    bare_clip_files = (os.path.exists(os.path.join(folder, "merges.txt"))
                       and not os.path.exists(os.path.join(folder, "tokenizer_config.json")))
    tokenizer = (CLIPTokenizer if bare_clip_files else AutoTokenizer).from_pretrained(folder)
    if tokenizer.eos_token_id != len(tokenizer) - 1 or tokenizer.bos_token_id is None:
        raise SystemExit(f"--tokenizer {folder}: end-of-text must be the last id of the vocabulary and a "
                         "start-of-text token must exist (CLIP pools at argmax of the token ids).")
    return tokenizer


def tokenizer_fingerprint(tokenizer):
    """sha256 of the tokenizer's full serialised state: vocabulary, merges, normaliser."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


def tokenize(tokenizer, texts, context_length):
    """[SOT] + tokens + [EOT], truncated to context_length and padded with 0, as OpenAI CLIP does."""
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    tokens = torch.zeros(len(ids), context_length, dtype=torch.long)
    for row, seq in enumerate(ids):
        seq = [tokenizer.bos_token_id] + seq[:context_length - 2] + [tokenizer.eos_token_id]
        tokens[row, :len(seq)] = torch.tensor(seq)
    return tokens


# ----------------------------------------------------------------------------- the CSV dataset

def read_csv(path, img_key="image_path", caption_key="caption", separator=None):
    """Rows of (image path, caption). The separator follows the extension (.tsv tab, else comma)."""
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        raise SystemExit(f"--train-data {path}: " + ("the file is empty." if os.path.isfile(path) else "no such file."))
    separator = separator or ("\t" if path.endswith(".tsv") else ",")
    with open(path, newline="", encoding="utf-8-sig") as f:  # utf-8-sig drops a byte-order mark
        reader = csv.DictReader(f, delimiter=separator)
        columns = reader.fieldnames or []
        for key, flag in ((img_key, "--csv-img-key"), (caption_key, "--csv-caption-key")):
            if key not in columns:
                raise SystemExit(f"{path}: no column '{key}'; columns are {columns}. Pass {flag}"
                                 + (" or --csv-separator (only one column was found)." if len(columns) == 1 else "."))
        rows = [(row[img_key], row[caption_key]) for row in reader]
    if not rows:
        raise SystemExit(f"{path}: the CSV has a header but no rows.")
    if len(set(rows)) < len(rows):
        print(f"warning: {path}: {len(rows) - len(set(rows))} duplicate rows (same image and caption); kept.")
    return rows


def check_paths(rows, image_root, csv_path, allow_absolute):
    """Refuse rows whose image path may leave --image-root (absolute, or any '..'): a CSV is data, not a key.
    The check reads the path's text, not the file system, so a dataset folder symlinked to another disk works;
    '..' is refused anywhere, because 'slides/../x' leaves the root when slides is such a symlink."""
    for number, (path, _) in enumerate(rows, start=1):
        if not allow_absolute and (os.path.isabs(path) or ".." in path.replace("\\", "/").split("/")):
            raise SystemExit(f"{csv_path}: data row {number}: image path {path!r} may point outside --image-root "
                             f"{image_root}. Fix the row, or pass --allow-absolute-paths if you trust the CSV.")


class BadSampleError(Exception):
    """An image or caption that cannot be used."""


def load_sample(path, caption, max_pixels, draft_size=None):
    """The image of a pair as RGB, or BadSampleError saying what is wrong with the pair."""
    if not caption.strip():
        raise BadSampleError("empty caption")
    try:
        return load_rgb(path, max_pixels, draft_size)
    except (OSError, SyntaxError, ValueError) as e:  # missing, empty, truncated, not an image, too large
        raise BadSampleError(f"unreadable image: {e}") from None


def sample_problem(item):
    try:
        load_sample(*item)
    except BadSampleError as e:
        return str(e)


def find_bad_samples(rows, indices, image_root, workers, max_pixels):
    """The --check-data pass over rows[indices]: read each image once, in parallel; {row index: reason}."""
    items = [(os.path.join(image_root, rows[i][0]), rows[i][1], max_pixels) for i in indices]
    checks = DataLoader(items, batch_size=None, num_workers=workers, collate_fn=sample_problem,
                        generator=torch.Generator())  # not the global generator: it seeds the model
    return {index: reason for index, reason in zip(indices, checks) if reason}


def atomic_write(path, write):
    """write(temporary path), a file or a new folder, then rename it into place. RULE 8: a kill leaves the
    old file intact, and no half-written one that a resume would load (remove_leftovers tidies up after it)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:  # disk full, no permission: say so, and leave no partial file behind
        raise SystemExit(f"cannot write {path}: {e.strerror or e}. Free some space or choose another output "
                         "folder; the files written before are intact.") from None
    finally:
        with contextlib.suppress(OSError):  # tidying up must not hide the error above
            shutil.rmtree(tmp) if os.path.isdir(tmp) else os.remove(tmp)


def remove_leftovers(run_dir):
    """The temporary files and folders (NAME.tmp<pid>) of atomic writes a killed run left in RUN or RUN/checkpoints."""
    for entry in [*Path(run_dir).glob("*.tmp[0-9]*"), *Path(run_dir).glob("checkpoints/*.tmp[0-9]*")]:
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def write_json(path, obj):
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class CsvDataset(Dataset):
    """Indexed by (epoch, sample index), so each sample's augmentation is a function of both."""

    def __init__(self, rows, image_root, tokenizer, image_size, context_length, rrc_scale_min, seed,
                 max_pixels=Image.MAX_IMAGE_PIXELS, jpeg_draft=False):
        self.rows, self.image_root, self.tokenizer = rows, image_root, tokenizer
        self.image_size, self.context_length = image_size, context_length
        self.rrc_scale_min, self.seed, self.max_pixels = rrc_scale_min, seed, max_pixels
        # --jpeg-draft: decode just large enough that the smallest crop RandomResizedCrop can take (area
        # rrc_scale_min, aspect 3/4) still has image_size pixels on its short side: never enlarged.
        self.draft_size = math.ceil(image_size / math.sqrt(rrc_scale_min * 3 / 4)) if jpeg_draft else None

    def __getitem__(self, key):
        epoch, index = key
        path, caption = self.rows[index]
        try:
            image = load_sample(os.path.join(self.image_root, path), caption, self.max_pixels, self.draft_size)
        except BadSampleError as e:
            raise BadSampleError(f"data row {index + 1} ({path}): {e}. Fix or remove the row, or pass "
                                 "--bad-samples skip to leave out every bad row, decided before training.") from None
        image = train_transform(image, self.image_size, self.rrc_scale_min, sample_seed(self.seed, epoch, index))
        return image, tokenize(self.tokenizer, [caption], self.context_length)[0]


class GlobalBatchSampler:
    """Yields, for every optimizer step from `start_step` on, this rank's micro-batches of (epoch, index).

    RULE 3: one global batch regardless of hardware. The dataset is permuted once per epoch from
    (seed, epoch); step s of the epoch takes the next `global_batch` samples of that permutation, and
    the world_size * accum_steps micro-batches are contiguous slices of it. 1 process x 16 samples,
    2 processes x 8, and 1 process x 2 accumulation steps x 8 see exactly the same set every step.
    The position is just the step number, so resuming needs no sampler state beyond it.
    `samples` are the usable row indices: all rows, or those left after --bad-samples skip.
    """

    def __init__(self, samples, batch_size, world_size, rank, accum_steps, seed, total_steps, start_step=0):
        self.batch_size, self.world_size, self.rank, self.accum_steps = batch_size, world_size, rank, accum_steps
        self.global_batch = batch_size * world_size * accum_steps
        self.steps_per_epoch = len(samples) // self.global_batch  # drop_last: every step is a full batch
        self.samples, self.seed, self.total_steps, self.start_step = list(samples), seed, total_steps, start_step

    def __iter__(self):
        for step in range(self.start_step, self.total_steps):
            epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
            if step == self.start_step or step_in_epoch == 0:  # a new epoch's permutation, a function of (seed, epoch)
                generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                permutation = [self.samples[i] for i in torch.randperm(len(self.samples), generator=generator).tolist()]
            batch = permutation[step_in_epoch * self.global_batch:(step_in_epoch + 1) * self.global_batch]
            for micro in range(self.accum_steps):
                start = (micro * self.world_size + self.rank) * self.batch_size
                yield [(epoch, index) for index in batch[start:start + self.batch_size]]

    def __len__(self):
        return (self.total_steps - self.start_step) * self.accum_steps


def make_train_loader(dataset, sampler, workers, seed, pin_memory):
    # RULE 1: seeded everywhere. The loader's generator only seeds worker processes; augmentation
    # itself is already fixed per sample (RULE 2), so this is belt and braces.
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                      persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
                      generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- the demo dataset
# Synthetic H&E-like tiles. Each tile is drawn as stain concentrations (hematoxylin for nuclei,
# eosin for cytoplasm and stroma) turned into colour by Beer-Lambert's law, as real stains absorb.
# Classes differ by subtle, overlapping cues driven by a latent "atypia" score whose distributions
# overlap between benign and malignant classes, so even a perfect model stays below 100%.

DEMO_CLASSES = {  # class: (phrases for captions; the first is the evaluation's class name)
    "colon_aca": ["colon adenocarcinoma", "adenocarcinoma of the colon", "malignant colonic glands",
                  "invasive colonic adenocarcinoma with crowded irregular glands"],
    "colon_n": ["benign colonic tissue", "normal colonic mucosa", "benign colon with regular crypts",
                "unremarkable colonic mucosa"],
    "lung_aca": ["lung adenocarcinoma", "adenocarcinoma of the lung", "malignant glandular lung tumor",
                 "pulmonary adenocarcinoma with acinar glands"],
    "lung_n": ["benign lung", "normal lung parenchyma", "benign lung with thin alveolar septa",
               "unremarkable alveolar lung tissue"],
    "lung_scc": ["lung squamous cell carcinoma", "squamous cell carcinoma of the lung",
                 "keratinizing squamous carcinoma of the lung", "pulmonary squamous cell carcinoma with keratin"],
    "node_n": ["lymph node", "benign lymph node", "reactive lymph node with small lymphocytes",
               "lymph node negative for tumor"],
    "node_met": ["lymph node containing metastatic tumor tissue", "metastatic carcinoma in a lymph node",
                 "lymph node with metastatic tumor deposits", "nodal metastasis of carcinoma"],
}
CAPTION_TEMPLATES = ["{}", "{}.", "H&E section of {}.", "{}, 20x.", "histology of {}", "microscopy: {}.",
                     "high power view of {}", "a case of {}.", "this tile shows {}.", "{} (hematoxylin and eosin)."]
MALIGNANT = {"colon_aca", "lung_aca", "lung_scc", "node_met"}
TILE = 96  # pixels, as PatchCamelyon's patches


def _ellipses(rng, yx, radius, elongation, strength):
    """Sum of soft-edged ellipses at centres `yx` (N, 2): a (TILE, TILE) concentration map. Each ellipse is
    evaluated only in a window around its centre, the windows summed with bincount: hundreds of nuclei in ~1 ms."""
    half = int(np.ceil(2 * (radius * elongation).max()))
    offsets = np.arange(-half, half + 1)
    ys = np.floor(yx[:, 0, None, None]).astype(int) + offsets[None, :, None]  # (N, W, 1)
    xs = np.floor(yx[:, 1, None, None]).astype(int) + offsets[None, None, :]  # (N, 1, W)
    angle = rng.uniform(0, np.pi, len(yx))[:, None, None]
    dy, dx = ys - yx[:, 0, None, None], xs - yx[:, 1, None, None]             # (N, W, W) by broadcasting
    u, v = dy * np.cos(angle) + dx * np.sin(angle), -dy * np.sin(angle) + dx * np.cos(angle)
    r = radius[:, None, None]
    d = np.minimum(np.sqrt((u / (r * elongation[:, None, None])) ** 2 + (v / r) ** 2), 10)
    values = strength[:, None, None] / (1 + np.exp(6 * (d - 1)))
    ys, xs = np.broadcast_to(ys, values.shape), np.broadcast_to(xs, values.shape)
    inside = (ys >= 0) & (ys < TILE) & (xs >= 0) & (xs < TILE)
    return np.bincount((ys * TILE + xs)[inside], values[inside], TILE * TILE).reshape(TILE, TILE).astype(np.float32)


def _ring(rng, centre, radius, count, jitter):
    """`count` points around a circle (gland epithelium), displaced by `jitter` pixels."""
    theta = np.linspace(0, 2 * np.pi, count, endpoint=False) + rng.uniform(0, 2 * np.pi)
    points = centre + radius * np.stack([np.sin(theta), np.cos(theta)], 1)
    return points + rng.normal(0, jitter + 1e-3, points.shape)


def render_tile(rng, label):
    """One RGB uint8 tile of class `label`."""
    organ = label.split("_")[0]
    # Colon's classes differ by atypia alone (no change of architecture), so its two means lie further apart.
    benign, malignant = (0.2, 0.75) if organ == "colon" else (0.3, 0.65)
    atypia = float(np.clip(rng.normal(malignant if label in MALIGNANT else benign, 0.15), 0, 1))
    zoom = rng.uniform(0.85, 1.15)
    hema, eosin = np.zeros((TILE, TILE), np.float32), np.full((TILE, TILE), rng.uniform(0.25, 0.45), np.float32)
    nuclei = []  # (centres, base radius) groups

    def holes(centres, radii):  # white spaces: gland lumens, alveoli
        eosin[:] = eosin * np.exp(-_ellipses(rng, centres, radii, np.ones(len(radii)), np.full(len(radii), 4.0)))

    # Lung tumours mix patterns, as real ones do: a solid area in an adenocarcinoma, a gland-like nest
    # in a squamous carcinoma. Then only keratin and cytoplasm tell them apart.
    pattern = {"colon": "glands", "node": "node", "lung": {
        "lung_n": "alveoli", "lung_aca": "glands" if rng.random() < 0.85 else "sheet",
        "lung_scc": "sheet" if rng.random() < 0.85 else "glands"}.get(label)}[organ]
    if organ == "lung":  # alveolar spaces in every lung tile; tumour fills most of them in
        count = 9 if pattern == "alveoli" else 3
        holes(rng.uniform(0, TILE, (count, 2)), zoom * rng.uniform(9, 14, count))
    if pattern == "glands":
        for _ in range(rng.integers(2, 5) if organ == "colon" else rng.integers(1, 3)):
            centre, radius = rng.uniform(15, 81, 2), zoom * rng.uniform(10, 15)
            holes(centre[None], np.array([radius * (0.6 - 0.35 * atypia)]))
            if rng.random() < atypia - 0.3:  # cribriform: extra small lumens bridging the gland
                holes(centre + rng.normal(0, radius / 3, (3, 2)), np.full(3, radius * 0.18))
            # Benign glands: one regular ring. Atypia: crowded, jittered, stratified (two rings).
            count = int(radius * (0.8 + 0.8 * atypia))
            nuclei.append((_ring(rng, centre, radius * 0.75, count, 4 * atypia * zoom), 2.3))
            if rng.random() < atypia:
                nuclei.append((_ring(rng, centre, radius * 1.05, count, 4 * atypia * zoom), 2.3))
            if organ == "colon" and rng.random() > atypia:  # goblet cells' pale mucin, lost in carcinoma
                holes(_ring(rng, centre, radius * 0.6, 6, 1.0), np.full(6, 2.2 * zoom))
    elif pattern == "sheet":  # cells on a jittered grid; squamous ones have pink cytoplasm and keratin pearls
        step = zoom * (10 - 2 * atypia)
        axis = np.arange(step / 2, TILE, step)
        yx = np.stack(np.meshgrid(axis, axis), -1).reshape(-1, 2)
        nuclei.append((yx + rng.normal(0, 1.5, yx.shape), 2.3))
        eosin += 0.25 if label == "lung_scc" else 0.1
        pearls = rng.integers(0, 3) if label == "lung_scc" else 0
        for centre in rng.uniform(15, 81, (pearls, 2)):
            eosin += 0.5 * _ellipses(rng, centre[None], np.array([7.0 * zoom]), np.ones(1), np.ones(1))
    elif pattern == "alveoli":  # thin septa holding sparse small nuclei
        nuclei.append((rng.uniform(0, TILE, (int(20 + 30 * atypia), 2)), 1.9))
    else:  # lymph node: a carpet of small dark lymphocytes; metastases add a cluster of large pale cells
        nuclei.append((rng.uniform(0, TILE, (int(zoom * 150), 2)), 1.8))
        if large := int(30 * atypia ** 2):
            nuclei.append((rng.uniform(25, 71, 2) + rng.normal(0, 12 * zoom, (large, 2)), 3.4))
    nuclei.append((rng.uniform(0, TILE, (int(12 + 8 * atypia), 2)), 1.8))  # scattered stromal cells everywhere

    for centres, base in nuclei:
        n = len(centres)
        # Atypia enlarges nuclei, varies their size (pleomorphism) and darkens them (hyperchromasia).
        radius = zoom * base * (1 + 0.5 * atypia) * np.exp(rng.normal(0, 0.08 + 0.25 * atypia, n))
        pale = 0.6 if base > 3 else 1.0  # tumour nuclei in nodes have open, paler chromatin
        strength = pale * rng.uniform(0.9, 1.3, n) * (0.9 + 0.4 * atypia)
        hema += _ellipses(rng, centres, radius, rng.uniform(1.0, 1.2 + 0.6 * atypia, n), strength)
    # Beer-Lambert: optical density = concentration x stain vector; stain colours vary slide to slide.
    h_vector = np.array([0.65, 0.70, 0.29]) * rng.uniform(0.85, 1.15, 3)
    e_vector = np.array([0.07, 0.99, 0.11]) * rng.uniform(0.85, 1.15, 3)
    density = hema[..., None] * h_vector + eosin[..., None] * e_vector
    density = density * rng.uniform(0.8, 1.2) + rng.normal(0, 0.03, density.shape)
    image = np.clip(255 * np.exp(-density), 0, 255).astype(np.uint8)
    return np.rot90(image, rng.integers(4)).copy()


def _write_demo(root, per_class_train, per_class_eval, seed):
    import h5py
    def rng_for(split, label, i):  # independent streams: any tile can be regenerated on its own
        return np.random.default_rng([seed, split, list(DEMO_CLASSES).index(label), i])

    rows = []
    for label in DEMO_CLASSES:
        os.makedirs(os.path.join(root, "train", label))
        for i in range(per_class_train):
            rng = rng_for(0, label, i)
            path = f"train/{label}/{i:05d}.jpg"
            Image.fromarray(render_tile(rng, label)).save(os.path.join(root, path), quality=90)
            rows.append((path, rng.choice(CAPTION_TEMPLATES).format(rng.choice(DEMO_CLASSES[label]))))
    rows.sort()  # the CSV order must not depend on the order we generated in
    with open(os.path.join(root, "train.csv"), "w", newline="") as f:
        csv.writer(f).writerows([("image_path", "caption")] + rows)
    # Held-out tiles in the released layouts: LC25000 folders of JPEGs and PatchCamelyon HDF5 files.
    for label in ("colon_aca", "colon_n", "lung_aca", "lung_n", "lung_scc"):
        folder = os.path.join(root, "lung_colon_image_set", f"{label.split('_')[0]}_image_sets", label)
        os.makedirs(folder)
        for i in range(per_class_eval):
            name = f"{label.replace('_', '').replace('colonaca', 'colonca')}{i + 1}.jpeg"
            Image.fromarray(render_tile(rng_for(1, label, i), label)).save(os.path.join(folder, name), quality=90)
    os.makedirs(os.path.join(root, "pcam"))
    for split_id, split, count in ((2, "train", 2 * per_class_eval), (3, "test", per_class_eval)):
        labels = [("node_n", "node_met")[i % 2] for i in range(2 * count)]
        x = np.stack([render_tile(rng_for(split_id, label, i), label) for i, label in enumerate(labels)])
        labels = [label == "node_met" for label in labels]
        for part, array in (("x", x), ("y", np.array(labels, np.uint8).reshape(-1, 1, 1, 1))):
            with h5py.File(os.path.join(root, "pcam", f"camelyonpatch_level_2_split_{split}_{part}.h5"), "w") as f:
                f.create_dataset(part, data=array)


def ensure_demo_data(root=DEMO_DIR, per_class_train=400, per_class_eval=100, seed=0):
    """Generate the demo dataset once; same bytes every time. Returns the path of its train.csv.

    Written into a temporary folder and renamed into place, so a crash leaves no half dataset and concurrent
    callers (e.g. tests) never read one. Under torchrun rank 0 calls this first while the others wait."""
    csv_path = os.path.join(root, "train.csv")
    if not os.path.exists(csv_path):
        tmp = f"{root}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        started = time.time()
        _write_demo(tmp, per_class_train, per_class_eval, seed)
        os.makedirs(os.path.dirname(root), exist_ok=True)
        try:
            os.rename(tmp, root)
        except OSError:  # somebody else finished first: theirs has the same bytes
            shutil.rmtree(tmp, ignore_errors=True)
        print(f"demo dataset written to {root} in {time.time() - started:.1f}s", file=sys.stderr)
    return csv_path


if __name__ == "__main__":
    print(ensure_demo_data())
