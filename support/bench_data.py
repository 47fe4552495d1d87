"""bench.py's measurements of the input side: what QUILT-1M's table costs in memory in the
trainer and its forked workers (--table-rows), how many cores per GPU decoding and cropping its
frames takes (--input-pipeline), what the bad-input checks cost (--checks), and what the
manifest's fingerprint of the image files costs (--fingerprint-rows)."""
import csv
import math
import multiprocessing
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

import data
from model import model_config
from support import demo_data, train_flags
from support.csv_table import QUILT_COLUMNS, check_paths
from support.errors import UsageError
from support.files import fingerprint_sample, images_fingerprint
from support.measure import peak_rss_mib
from support.resize import resize_image

WORDS = ("tissue", "nuclei", "stroma", "gland", "mitotic", "figure", "carcinoma", "benign",
         "lymphocytes", "necrosis", "eosinophilic", "cytoplasm", "at", "high", "power", "we",
         "see", "the", "a", "of", "with", "and", "this", "is", "pleomorphic", "infiltrating")


QUILT_FRAME_SIZES = [(640, 360), (1280, 720), (1920, 1080)]  # (width, height) of video frames


def write_quilt_shaped_csv(path, rows, seed=0, frame_sizes=QUILT_FRAME_SIZES):
    """A CSV of QUILT-1M's 13 columns and `rows` rows: captions of 8 to 60 words, video-frame
    paths, sizes taken in turn from `frame_sizes`, 90% train and 10% val. A second or two per
    100,000 rows."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(8, 61, rows)  # words per caption
    picked = rng.integers(0, len(WORDS), lengths.sum())
    # One long text; caption i is a slice of it, cut at a space: no per-word Python work.
    text = " ".join(WORDS[i] for i in picked.tolist()) + " "
    word_ends = np.cumsum(np.array([len(word) + 1 for word in WORDS])[picked])
    caption_ends = word_ends[np.cumsum(lengths) - 1].tolist()
    caption_starts = [0] + caption_ends[:-1]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(QUILT_COLUMNS)
        for index in range(rows):
            caption = text[caption_starts[index]:caption_ends[index] - 1]
            split = "val" if index % 10 == 9 else "train"
            width, height = frame_sizes[index % len(frame_sizes)]
            image_path = f"{index % 4096:04x}/video_{index // 50:06d}_frame_{index:07d}.jpg"
            writer.writerow([index, caption, image_path, "youtube", split, "['breast']", "[]",
                             "[]", "[]", "[]", 10, height, width])
    return path


def pss_bytes(pid="self"):
    """The proportional set size of a process (Linux): its private pages, plus each shared page
    divided by the number of processes sharing it."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    raise OSError(f"/proc/{pid}/smaps_rollup has no Pss line")


def touch_every_row(rows, barrier, connection):
    """A forked worker's epoch, without the images: read every row; send PSS before and after.

    PSS divides a shared page among its sharers, so each measure waits for all the workers: the
    same processes share the pages at both, and only pages copied into this worker count."""
    barrier.wait()
    before = pss_bytes()
    barrier.wait()
    for index in range(len(rows)):
        path, caption = rows[index]  # as CsvDataset reads a row: list rows copy pages here
    barrier.wait()
    connection.send((before, pss_bytes()))
    barrier.wait()
    connection.close()


def epoch_in_workers(rows, workers):
    """Fork `workers` processes that each touch every row, as DataLoader workers do in an epoch;
    [(PSS before, PSS after)] of each (Linux only: fork and /proc)."""
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(workers)
    results = []
    for _ in range(workers):
        receiver, sender = context.Pipe(duplex=False)
        process = context.Process(target=touch_every_row, args=(rows, barrier, sender))
        process.start()
        results.append((process, receiver))
    measured = []
    for process, receiver in results:
        measured.append(receiver.recv())
        process.join()
    return measured


class RowLengths(torch.utils.data.Dataset):
    """A dataset that reads the rows and no image: (epoch, index) -> the row's two lengths."""

    def __init__(self, rows):
        self.rows = rows

    def __getitem__(self, key):
        path, caption = self.rows[key[1]]
        return torch.tensor([len(path), len(caption)])


def node_pss(pid):
    """PSS of a process and its children: the memory they take together."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        children = f.read().split()
    return pss_bytes(pid) + sum(node_pss(child) for child in children)


def loader_epoch_memory(rows, workers, batch_size=64):
    """One epoch of train.py's sampler and DataLoader over the rows (no images): the peak PSS
    of this process and its workers together, sampled every 100 batches."""
    sampler = data.GlobalBatchSampler(np.arange(len(rows)), batch_size, 1, 0, 1, 0,
                                      len(rows) // batch_size)
    loader = data.make_train_loader(RowLengths(rows), sampler, workers, 0, False)
    peak = 0
    for step, _ in enumerate(loader):
        if step % 100 == 0:
            peak = max(peak, node_pss(os.getpid()))
    return max(peak, node_pss(os.getpid()))


def table_memory(rows_wanted, workers):
    """--table-rows: what QUILT-1M's table costs in the trainer, and in forked workers that
    touch every row as an epoch does (PSS: a table each worker copied would show up there)."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "quilt_shaped.csv")
        started = time.perf_counter()
        # In a child process, so that the trainer's peak memory below is the table's alone.
        writer = multiprocessing.get_context("fork").Process(
            target=write_quilt_shaped_csv, args=(path, rows_wanted))
        writer.start()
        writer.join()
        written = time.perf_counter()
        rows, sizes, split_filter = data.read_csv_table(path)
        read = time.perf_counter()
    text_bytes = len(rows.paths.buffer) + len(rows.captions.buffer)
    per_million = rows.nbytes / len(rows) * 1e6
    print(f"table: {split_filter['rows_in_csv']:,} QUILT-shaped rows written in "
          f"{written - started:.1f} s, {len(rows):,} train rows read in {read - written:.1f} s "
          f"({(read - written) / len(rows) * 1e6:.1f} s per million)")
    print(f"table memory: {rows.nbytes / 2**20:.1f} MiB for {len(rows):,} rows "
          f"({text_bytes / 2**20:.1f} MiB of UTF-8 paths and captions, the rest offsets) + "
          f"{sizes.nbytes / 2**20:.1f} MiB of sizes = {per_million / 2**20:.0f} MiB per million "
          "rows, once per node")
    if not sys.platform.startswith("linux"):
        print("workers: PSS is read from /proc, Linux only; skipped")
        return
    if workers:  # --workers 0: the loader's epoch below runs in this process alone
        measured = epoch_in_workers(rows, workers)
        growth = max(after - before for before, after in measured)
        print(f"workers: {workers} forked, each touched every row; the largest PSS growth of "
              f"one worker {growth / 2**20:.1f} MiB ({growth / rows.nbytes:.1%} of the table)")
    peak = loader_epoch_memory(rows, workers)
    print(f"an epoch of the sampler and DataLoader ({workers} workers, no images): peak PSS of "
          f"the trainer and its workers {peak / 2**20:.1f} MiB; the trainer's peak RSS "
          f"{peak_rss_mib():.1f} MiB; UTF-8 paths + captions {text_bytes} bytes")


# --input-pipeline's frames: QUILT-1M's 1080p and 720p video frames, and what
# `python data.py resize --short-side 256` leaves of a 16:9 frame.
PRE_RESIZED = (455, 256)


PIPELINE_FRAMES = [(1920, 1080), (1280, 720), PRE_RESIZED]


def paint_frame(rng, tiles, zoom=3):
    """A QUILT-like 1920x1080 H&E frame: a mosaic of demo-painter tiles, each enlarged `zoom`
    times. Texture matters: a flat frame would decode unrealistically fast."""
    field = zoom * demo_data.TILE
    picks = rng.integers(0, len(tiles), (math.ceil(1080 / field), math.ceil(1920 / field)))
    # (rows * TILE, columns * TILE, 3): each row of tiles side by side, the rows stacked.
    mosaic = np.concatenate([np.concatenate([tiles[i] for i in row], axis=1) for row in picks])
    enlarged_size = (zoom * mosaic.shape[1], zoom * mosaic.shape[0])
    enlarged = Image.fromarray(mosaic).resize(enlarged_size, Image.BICUBIC)
    return enlarged.crop((0, 0, 1920, 1080))


def write_frames(folder, rows, sizes, seed):
    """A JPEG for each row, of the row's size: a painted frame resized (quality 90), or, for
    PRE_RESIZED, what data.py's resize writes of a 1080p one. {size: the rows' indices}."""
    rng = np.random.default_rng(seed)
    tiles = [demo_data.render_tile(rng, label) for label in demo_data.DEMO_CLASSES]
    frames = {}
    for index, size in enumerate(map(tuple, sizes.tolist())):
        frames.setdefault(size, []).append(index)
        path = os.path.join(folder, rows[index][0])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        frame = paint_frame(rng, tiles)
        if size == PRE_RESIZED:
            frame.save(os.path.join(folder, "full_size.jpg"), quality=90)
            resize_image(os.path.join(folder, "full_size.jpg"), path, size[1], math.inf)
        else:
            frame.resize(size, Image.BICUBIC).save(path, quality=90)
    return frames


def pipeline_datasets(rows, image_root):
    """train.py's CsvDataset with full decode and with --jpeg-draft: train.py's defaults,
    ViT-B-32's 224 px crops and 77 tokens, a tokenizer trained on the captions."""
    train_args = train_flags.parse_args([])
    cfg = model_config("ViT-B-32")
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        data.train_tokenizer([caption for _, caption in rows], tokenizer_dir, 1000)
        tokenizer = data.load_tokenizer(tokenizer_dir)
    datasets = {}
    for decode, jpeg_draft in (("full", False), ("--jpeg-draft", True)):
        datasets[decode] = data.CsvDataset(
            rows, image_root, tokenizer, cfg.image_size, cfg.context_length,
            train_args.rrc_scale, train_args.seed, train_args.max_image_pixels, jpeg_draft,
            train_args.rrc_ratio)
    return datasets


def seconds_per_image(datasets, frames, rounds=3):
    """{(frame size, decode): CPU seconds per dataset[(0, index)] over that size's frames}, the
    best of `rounds` passes. CPU time, not the wall clock: an image's cost in core-seconds,
    which is what cores per GPU need, and less disturbed by other work on a shared machine."""
    best = {}
    for _ in range(rounds):  # interleaved, so that a slow moment of a shared machine hits all
        for size, indices in frames.items():
            for decode, dataset in datasets.items():
                started = time.process_time()
                for index in indices:
                    dataset[(0, index)]
                seconds = (time.process_time() - started) / len(indices)
                best[size, decode] = min(best.get((size, decode), math.inf), seconds)
    return best


def print_pipeline_table(seconds, kib, gpu_samples_per_s):
    """Images/s per core and the cores per GPU for each frame size and decode; the speed-ups."""
    print(f"| frames | JPEG KiB | decode | ms per image | images/s per core "
          f"| cores per GPU at {gpu_samples_per_s:g} samples/s |")
    print("|---|---|---|---|---|---|")
    for (width, height), decode in seconds:
        per_core = 1 / seconds[(width, height), decode]
        print(f"| {width}x{height} | {kib[width, height]:.0f} | {decode} | {1e3 / per_core:.1f} "
              f"| {per_core:.1f} | {gpu_samples_per_s / per_core:.1f} |")
    print(f"{gpu_samples_per_s:g} samples/s is given (--gpu-samples-per-s), not measured here; "
          "the default: ViT-B-32, bf16, --no-deterministic, one H100, measured on another machine")
    for width, height in PIPELINE_FRAMES[:-1]:
        full = seconds[(width, height), "full"] / seconds[PRE_RESIZED, "full"]
        draft = seconds[(width, height), "--jpeg-draft"] / seconds[PRE_RESIZED, "--jpeg-draft"]
        print(f"pre-resized {PRE_RESIZED[0]}x{PRE_RESIZED[1]} over {width}x{height}: {full:.1f}x "
              f"the images/s with full decode, {draft:.1f}x with --jpeg-draft on both")


def print_bytes_in_flight(batch_size=256, workers=8, prefetch=4):
    """Arithmetic: a batch of 224 px images as float32 and as uint8, and the workers x prefetch
    batches a DataLoader holds (train.py --workers 8; data.make_train_loader's prefetch 4)."""
    for dtype in ("float32", "uint8"):
        batch = batch_size * 3 * 224 * 224 * getattr(torch, dtype).itemsize
        in_flight = batch * workers * prefetch
        print(f"worker boundary (arithmetic, not measured): a batch of {batch_size} x 3 x 224 "
              f"x 224 {dtype} is {batch / 2**20:.1f} MiB; {workers} workers x prefetch "
              f"{prefetch} hold {in_flight / 2**30:.2f} GiB")


def input_pipeline(count, gpu_samples_per_s, seed):
    """--input-pipeline: images/s per core of train.py's input path on QUILT-like frames, and
    the cores per GPU that a training rate needs."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        csv_path = os.path.join(folder, "frames.csv")
        write_quilt_shaped_csv(csv_path, count * len(PIPELINE_FRAMES), seed, PIPELINE_FRAMES)
        rows, sizes, _ = data.read_csv_table(csv_path, split_value="all")
        frames = write_frames(folder, rows, sizes, seed)
        kib = {}
        for size, indices in frames.items():
            paths = [os.path.join(folder, rows[index][0]) for index in indices]
            kib[size] = statistics.mean(map(os.path.getsize, paths)) / 1024
        datasets = pipeline_datasets(rows, folder)
        sample = datasets["full"][(0, 0)]
        if isinstance(sample, data.BadSample):
            raise UsageError(f"--input-pipeline: a frame it wrote fails: {sample.message}")
        seconds = seconds_per_image(datasets, frames)
    image = sample[0]  # (3, 224, 224): uint8, or float32 where the workers normalise
    print(f"input pipeline: data.CsvDataset[(epoch, index)] = decode, RandomResizedCrop to "
          f"{image.shape[-1]} px, {image.dtype} tensor, tokenise; one process, one thread; "
          f"{count} QUILT-like frames per size, CPU time, the best of 3 passes")
    print_pipeline_table(seconds, kib, gpu_samples_per_s)
    print_bytes_in_flight()


def checks_overhead():
    """What data.py's robustness checks cost the happy path: per image, per CSV row at start-up."""
    torch.set_num_threads(1)
    csv_path = demo_data.ensure_demo_data()
    root = os.path.dirname(csv_path)
    rows = data.read_csv(csv_path)[:600]
    max_pixels = train_flags.parse_args([]).max_image_pixels

    def per_image(load):  # decode + train transform of the demo JPEGs, one thread
        started = time.perf_counter()
        for i, (path, caption) in enumerate(rows):
            data.train_transform(load(os.path.join(root, path), caption), 64, 0.8, i)
        return (time.perf_counter() - started) / len(rows)
    plain = []
    checked = []
    for _ in range(5):  # interleaved, so that a slow moment of a shared machine hits both
        plain.append(per_image(lambda path, caption: Image.open(path).convert("RGB")))
        checked.append(per_image(lambda path, caption: data.load_sample(path, caption, max_pixels)))
    cost = 100 * (min(checked) / min(plain) - 1)
    print(f"per image: plain PIL {min(plain) * 1e6:.0f} us, data.load_sample with its checks "
          f"{min(checked) * 1e6:.0f} us ({cost:+.1f}%)")
    many = [path for path, _ in rows] * 170
    started = time.perf_counter()
    check_paths(many, root, csv_path, False)
    per_row = (time.perf_counter() - started) / len(many)
    print(f"path check at start-up: {per_row * 1e6:.1f} us per CSV row "
          f"(QUILT-1M's ~1M rows: ~{per_row * 1e6:.0f} s)")


def fingerprint_cost(rows_wanted, seed=0, distinct_frames=16):
    """--fingerprint-rows: what support.files.images_fingerprint costs train.py's start on a
    QUILT-shaped CSV of `rows_wanted` rows: the files it reads, their bytes, the seconds. The
    files it samples are links to a few painted frames of QUILT's sizes (JPEG quality 90), so the
    page cache holds them: the seconds are opening and hashing; a cold disk adds the bytes
    divided by its read rate."""
    with tempfile.TemporaryDirectory() as folder:
        csv_path = write_quilt_shaped_csv(os.path.join(folder, "quilt.csv"), rows_wanted, seed)
        rows, _, _ = data.read_csv_table(csv_path)  # the train split, as train.py reads it
        rng = np.random.default_rng(seed)
        tiles = [demo_data.render_tile(rng, label) for label in demo_data.DEMO_CLASSES]
        frames = []
        for index in range(distinct_frames):
            size = QUILT_FRAME_SIZES[index % len(QUILT_FRAME_SIZES)]
            frames.append(os.path.join(folder, f"frame_{index}.jpg"))
            paint_frame(rng, tiles).resize(size, Image.BICUBIC).save(frames[-1], quality=90)
        sampled = fingerprint_sample(len(rows))
        read = 0
        for number, index in enumerate(sampled):
            path = os.path.join(folder, "images", rows.paths[index])
            os.makedirs(os.path.dirname(path), exist_ok=True)
            os.symlink(frames[number % distinct_frames], path)
            read += os.path.getsize(path)
        started = time.perf_counter()
        fingerprint = images_fingerprint(rows.paths, os.path.join(folder, "images"))
        seconds = time.perf_counter() - started
    print(f"images fingerprint of {len(rows):,} training rows: {fingerprint['files']:,} files, "
          f"{read / 2**20:,.0f} MiB read, {seconds:.2f} s with the files page-cached (a CSV of "
          "more rows samples as many files)")
