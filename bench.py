"""How fast does CLIP train here? Samples/s, step time, peak memory, model FLOPs utilisation.

Runs train.py's own step (train_step, make_optimizer, AdamW) on synthetic tensors already on the
device, then on the real pipeline (the demo dataset through CsvDataset, GlobalBatchSampler and
make_train_loader), and times the data pipeline alone. It trains nothing worth keeping.

The widened tiny model of docs/performance.md (64 px, patch 8, 4+4 layers of width 256, context 32,
OpenCLIP's vocabulary of 49408, batch 64, fp32):
    python bench.py --model tiny --width 256 --text-width 256 --vocab-size 49408 --batch-size 64
A published size in bf16, compiled, with the fast non-deterministic kernels:
    python bench.py --model ViT-B-32 --batch-size 256 --precision bf16 --compile \
        --no-deterministic --workers 8
What the checks against bad input cost the happy path:
    python bench.py --checks
What QUILT-1M's table costs in memory, in the trainer and in its forked loader workers:
    python bench.py --table-rows 200000 --workers 4
How many cores per GPU decoding and cropping QUILT-1M's frames takes, with and without
--jpeg-draft, and what a pre-resize to short side 256 saves:
    python bench.py --input-pipeline
What train.py's tree reduction of the gradients (RULE 3) costs against DDP's all-reduce:
    python bench.py --ddp 2 --width 256 --text-width 256 --vocab-size 49408 --batch-size 16
A quick look on a laptop:
    python bench.py --steps 5 --warmup 2 --batch-size 32
"""
import argparse
import csv
import itertools
import math
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import demo_data
import plumbing
import train
from plumbing import UsageError
from model import CLIP, model_config


# ----------------------------------------------------------------------------- model FLOPs

def model_flops(cfg, batch_size):
    """Matmul FLOPs of one training step (forward + backward) at `batch_size`: the numerator of MFU.

    A (m, k) x (k, n) matmul is 2*m*k*n FLOPs; layer norms, softmax, GELU, the embedding lookup and
    the optimizer do too little arithmetic to count. A matmul's backward is two matmuls of its size
    (the gradients of both operands), so backward = 2 x forward, except for the patch embedding,
    whose input (the images) needs no gradient: only its weight gradient, 1 x forward. Attention
    scores are counted over the full L x L, also in the causal text tower, as FlopCounterMode and
    PyTorch's math kernel do (flash kernels skip about half of that masked work, small here).
    Recomputation (--grad-checkpointing, flash attention's backward) is work the hardware does and
    the model does not need: not counted (PaLM's definition of MFU). tests/test_bench.py checks
    this against torch.utils.flop_counter.FlopCounterMode.
    """
    def tower(tokens, width, layers):  # forward FLOPs of one Transformer, one sample
        linear = 2 * tokens * width * (3 * width + width + 4 * width + 4 * width)  # qkv, out, mlp
        attention = 2 * 2 * tokens * tokens * width  # Q K^T and scores x V, all heads together
        return layers * (linear + attention)

    grid = cfg.image_size // cfg.patch_size
    patch_embedding = 2 * grid * grid * cfg.vision_width * 3 * cfg.patch_size ** 2  # conv1's matmul
    vision = patch_embedding + tower(1 + grid * grid, cfg.vision_width, cfg.vision_layers)
    vision += 2 * cfg.vision_width * cfg.embed_dim  # class token -> embed_dim
    text = tower(cfg.context_length, cfg.text_width, cfg.text_layers)
    text += 2 * cfg.text_width * cfg.embed_dim      # end-of-text token -> embed_dim
    # One (B, E) x (E, B) matmul gives the logits of both directions (logits_per_text: transposed).
    logits = 2 * batch_size * batch_size * cfg.embed_dim
    forward = batch_size * (vision + text) + logits
    return 3 * forward - batch_size * patch_embedding


# ----------------------------------------------------------------------------- measuring

def time_steps(step, warmup, steps, device):
    """Call step() warmup + steps times; the seconds of each timed call, the device synchronised
    around it (no running ahead into the next step: slightly pessimistic for tiny models)."""
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def peak_meter(device, dtype, size):
    """A function repeats -> the device's achievable FLOP/s now: the fastest of `repeats` (size x
    size) matmuls in this dtype. Called at the start, after every synthetic step and at the end; its
    matrices live only during the call, adding nothing to the memory the steps are charged with."""
    def peak_now(repeats):
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        return 2 * size ** 3 / min(time_steps(lambda: a @ b, 1, repeats, device))
    return peak_now


def peak_rss_mib():
    """The process's peak resident memory so far; ru_maxrss is in KiB on Linux, bytes on macOS."""
    unit = 2**20 if sys.platform == "darwin" else 2**10
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / unit


def peak_memory_mib(device):
    """CUDA's max allocated since reset_peak_memory_stats; on the CPU, the peak RSS so far."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mib()


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:  # Linux names the CPU model here; platform.processor() is often empty
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def training_step(model, raw_model, optimizer, train_args, autocast, batches, device):
    """One optimizer step as train.py's loop takes it (without the lr schedule and logging)."""
    def step():
        micro_batches = train.next_micro_batches(batches, 1, device)
        train.train_step(model, micro_batches, train_args, autocast)
        train.optimizer_step(raw_model, optimizer, train_args)
    return step


def synthetic_batch(cfg, batch_size, device):
    """Random pixels and token ids, already on the device: a step with no data loading at all."""
    images = torch.randn(batch_size, 3, cfg.image_size, cfg.image_size, device=device)
    tokens = torch.randint(1, cfg.vocab_size - 1, (batch_size, cfg.context_length), device=device)
    tokens[:, -1] = cfg.vocab_size - 1  # end-of-text, the largest id: where the text tower pools
    return images, tokens


def measure(name, step, args, flops, peak, device, peak_now=None):
    """Time `step` (median of --steps after --warmup) and print the figures; returns samples/s and
    the MFU beside each step (None without `peak_now`).

    MFU is model FLOP/s over `peak`, measured at the start. A shared machine's speed drifts (its
    matmul peak can double within seconds), so `peak_now`, if given, times a peak matmul right
    after each step, under the same conditions; the median of these ratios is printed too. Only for
    the synthetic steps: in the real pipeline, workers would prepare batches off the clock."""
    time_steps(step, args.warmup, 0, device)  # warm-up only
    times = []
    mfus_now = []
    memory = 0
    for _ in range(args.steps):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times += time_steps(step, 0, 1, device)
        memory = max(memory, peak_memory_mib(device))
        if peak_now is not None:
            mfus_now.append(flops / times[-1] / peak_now(1))
    step_time = statistics.median(times)
    samples_per_s = args.batch_size / step_time
    mfu = flops / step_time / peak
    mfu_now = statistics.median(mfus_now) if mfus_now else None
    beside = f", {100 * mfu_now:.1f}% of the peak after each step" if mfu_now is not None else ""
    memory_kind = "CUDA max allocated" if device.type == "cuda" else "process peak RSS"
    print(f"{name}: step {1e3 * step_time:.1f} ms (median of {len(times)}; "
          f"min {1e3 * min(times):.1f}, max {1e3 * max(times):.1f}), "
          f"{samples_per_s:.1f} samples/s, {flops / step_time / 1e9:.1f} GFLOP/s of model FLOPs "
          f"= {100 * mfu:.1f}% MFU of the start peak{beside}, "
          f"peak memory {memory:.0f} MiB ({memory_kind})")
    return samples_per_s, mfu_now


# ----------------------------------------------------------------------------- flags

OVERRIDES = {"--image-size": "image_size", "--patch-size": "patch_size", "--width": "vision_width",
             "--layers": "vision_layers", "--text-width": "text_width",
             "--text-layers": "text_layers", "--context-length": "context_length",
             "--vocab-size": "vocab_size", "--embed-dim": "embed_dim"}
# The cores this process may use (fewer than the machine's, if pinned).
ALL_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--model", default="tiny", help="tiny, ViT-B-32, ViT-B-16, or an OpenCLIP model-config JSON")
    for flag, field in OVERRIDES.items():
        a(flag, type=int, default=None, dest=field, help=f"override the model's {field}")
    a("--batch-size", type=int, default=64,
      help="per step, as train.py's --batch-size on one process")
    a("--steps", type=int, default=20,
      help="timed steps per part; the median step time is reported")
    a("--warmup", type=int, default=5,
      help="untimed steps first (kernel selection, allocator, compilation)")
    a("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16 = autocast, as train.py")
    a("--compile", action="store_true",
      help="torch.compile the model (it compiles in the warm-up steps)")
    a("--deterministic", action=argparse.BooleanOptionalAction, default=True,
      help="train.py's default (RULE 7: no TF32, deterministic kernels); "
           "--no-deterministic for speed")
    a("--grad-checkpointing", action="store_true",
      help="recompute activations in backward (not model FLOPs)")
    a("--workers", type=int, default=2,
      help="data-loader processes for the real pipeline and --table-rows, as train.py")
    a("--world-size", type=int, default=8, help="only for the printed size of the loss logits")
    a("--threads", type=int, default=ALL_CORES, help="torch threads; the default is all our cores")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a("--device", default=device)
    a("--peak-size", type=int, default=None,
      help="side of the peak matmul; None: 8192 on CUDA, 2048 on CPU")
    a("--seed", type=int, default=0)
    a("--checks", action="store_true",
      help="instead: time the bad-input checks of data.py (per image, per row)")
    a("--table-rows", type=int, default=None,
      help="instead: read a QUILT-shaped CSV of this many rows (QUILT-1M: 1,017,712); print "
           "its read time, its memory and what an epoch of --workers adds")
    a("--input-pipeline", action="store_true",
      help="instead: images/s per core of train.py's input path (one thread) on QUILT-like "
           "1080p, 720p and pre-resized JPEGs, and the cores per GPU a training rate needs")
    a("--frames", type=int, default=32, help="--input-pipeline: JPEGs per frame size")
    a("--gpu-samples-per-s", type=float, default=4291,
      help="--input-pipeline: the training rate to feed (default: ViT-B-32, bf16, "
           "--no-deterministic, one H100: a figure measured on another machine)")
    a("--ddp", type=int, default=0, metavar="N",
      help="instead: DDP steps on N gloo processes of one thread, DDP's all-reduce against "
           "train.py's tree hook")
    args = p.parse_args(argv)
    at_least_one = min(args.batch_size, args.steps, args.threads, args.world_size)
    if at_least_one < 1 or min(args.warmup, args.workers) < 0:
        raise UsageError("--batch-size, --steps, --threads and --world-size must be at least 1, "
                         "--warmup and --workers at least 0.")
    if args.table_rows is not None and args.table_rows < 1:
        raise UsageError("--table-rows must be at least 1.")
    if args.frames < 1 or not 0 < args.gpu_samples_per_s < math.inf:
        raise UsageError("--frames must be at least 1, --gpu-samples-per-s a positive number.")
    if args.ddp == 1 or args.ddp < 0:
        raise UsageError("--ddp N compares reductions over N >= 2 processes.")
    return args


def bench_config(args):
    """--model, then the size flags on top of it."""
    overrides = {}
    for field in OVERRIDES.values():
        if getattr(args, field) is not None:
            overrides[field] = getattr(args, field)
    return replace(model_config(args.model), **overrides)


def as_train_args(args):
    """The Namespace train.py would run with, so that the optimizer and the loss are the users'."""
    flags = ["--model", args.model, "--batch-size", args.batch_size,
             "--precision", args.precision, "--workers", args.workers, "--seed", args.seed,
             "--deterministic" if args.deterministic else "--no-deterministic"]
    if args.grad_checkpointing:
        flags.append("--grad-checkpointing")
    return train.parse_args([str(flag) for flag in flags])


# ----------------------------------------------------------------------------- the real pipeline

def demo_loaders(cfg, train_args, device):
    """A function of the step count -> an iterator over demo batches, as train.py's loader."""
    csv_path = demo_data.ensure_demo_data()
    rows = data.read_csv(csv_path)
    batch_size = train_args.batch_size
    if len(rows) < batch_size:
        raise UsageError(f"the demo dataset has {len(rows)} pairs, "
                         f"fewer than --batch-size {batch_size}.")
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        data.train_tokenizer([caption for _, caption in rows], tokenizer_dir, cfg.vocab_size)
        tokenizer = data.load_tokenizer(tokenizer_dir)
    # The model stays the synthetic part's, so that the two samples/s differ by the data pipeline
    # alone; the tokenizer's ids are a subset of its vocabulary (train.py would shrink it).
    print(f"real pipeline: demo dataset ({len(rows)} pairs), tokenizer of {len(tokenizer)} "
          f"tokens, {train_args.workers} workers")
    dataset = data.CsvDataset(rows, os.path.dirname(csv_path), tokenizer, cfg.image_size,
                              cfg.context_length, train_args.rrc_scale, train_args.seed)

    def loader(steps):
        sampler = data.GlobalBatchSampler(range(len(rows)), batch_size, 1, 0, 1,
                                          train_args.seed, steps)
        pin_memory = device.type == "cuda"
        return iter(data.make_train_loader(dataset, sampler, train_args.workers, train_args.seed,
                                           pin_memory))
    return loader


def data_pipeline_rate(loader, batch_size, workers, steps):
    """Images/s the loader delivers alone: decoded, cropped, normalised, tokenised."""
    skip = max(1, workers)  # the workers start together, their first batches arrive at once: skip
    batches = loader(skip + steps)
    seconds = time_steps(lambda: next(batches), skip, steps, torch.device("cpu"))
    return steps * batch_size / sum(seconds)


# ----------------------------------------------------------------------------- the CSV table

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
        writer.writerow(data.QUILT_COLUMNS)
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


# ----------------------------------------------------------------------------- the input pipeline

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
            data.resize_image(os.path.join(folder, "full_size.jpg"), path, size[1], math.inf)
        else:
            frame.resize(size, Image.BICUBIC).save(path, quality=90)
    return frames


def pipeline_datasets(rows, image_root):
    """train.py's CsvDataset with full decode and with --jpeg-draft: train.py's defaults,
    ViT-B-32's 224 px crops and 77 tokens, a tokenizer trained on the captions."""
    train_args = train.parse_args([])
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


# ----------------------------------------------------------------------------- the benchmark

def checks_overhead():
    """What data.py's robustness checks cost the happy path: per image, per CSV row at start-up."""
    torch.set_num_threads(1)
    csv_path = demo_data.ensure_demo_data()
    root = os.path.dirname(csv_path)
    rows = data.read_csv(csv_path)[:600]
    max_pixels = train.parse_args([]).max_image_pixels

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
    data.check_paths(many, root, csv_path, False)
    per_row = (time.perf_counter() - started) / len(many)
    print(f"path check at start-up: {per_row * 1e6:.1f} us per CSV row "
          f"(QUILT-1M's ~1M rows: ~{per_row * 1e6:.0f} s)")


def compile_failure(error):
    """The one-line UsageError for a torch.compile that failed in the warm-up steps."""
    reason = (str(error).strip().splitlines() or [""])[0][:300]
    return UsageError(f"--compile: torch.compile failed ({type(error).__name__}: {reason}). "
                      "Run without --compile, or fix the cause (on the CPU, Inductor needs a "
                      "C++ compiler).")


def reduction_worker(rank, world, rendezvous, args, results):
    """One of `world` gloo processes: DDP steps with DDP's own all-reduce and with train.py's
    tree hook, by turns; rank 0 saves the step times."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=world)
    train_args = as_train_args(args)
    cfg = bench_config(args)
    cpu = torch.device("cpu")
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")
    batches = itertools.repeat(synthetic_batch(cfg, args.batch_size, cpu))
    steps = {}
    for name in ("DDP's all-reduce", "the tree hook"):
        raw_model = CLIP(cfg).train()
        if name == "the tree hook":
            model = train.distribute(raw_model, train_args, world)
        else:
            model = DDP(raw_model, gradient_as_bucket_view=True, static_graph=True)
        optimizer = train.make_optimizer(raw_model, train_args)
        steps[name] = training_step(model, raw_model, optimizer, train_args, autocast, batches,
                                    cpu)
    times = {name: [] for name in steps}
    for _ in range(2):  # by turns: a shared machine's slow moments hit both
        for name, step in steps.items():
            times[name] += time_steps(step, args.warmup, args.steps, cpu)
    if rank == 0:
        torch.save(times, results)
    dist.destroy_process_group()


def reduction_cost(args):
    """What train.py's tree reduction (RULE 3) costs a step, against DDP's all-reduce."""
    with tempfile.TemporaryDirectory() as folder:
        results = os.path.join(folder, "times.pt")
        rendezvous = os.path.join(folder, "rendezvous")
        mp.spawn(reduction_worker, args=(args.ddp, rendezvous, args, results), nprocs=args.ddp)
        times = torch.load(results, weights_only=True)
    plain = statistics.median(times["DDP's all-reduce"])
    tree = statistics.median(times["the tree hook"])
    print(f"{args.ddp} gloo processes x 1 thread, {args.model}, batch {args.batch_size} per "
          f"process, {args.precision}: step {1e3 * plain:.1f} ms with DDP's all-reduce, "
          f"{1e3 * tree:.1f} ms with the tree hook ({100 * (tree / plain - 1):+.1f}%; medians "
          f"of {len(times['the tree hook'])})")


def print_setup(args, cfg, device, freed_memory_kept):
    """Everything that decides the figures, and the loss's memory at --world-size."""
    print(f"device {device} ({device_name(device)}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads, {args.precision}, "
          f"deterministic {args.deterministic}, TF32 {torch.backends.cuda.matmul.allow_tf32}, "
          f"compile {args.compile}, grad checkpointing {args.grad_checkpointing}")
    print(f"model {args.model}: {asdict(cfg)}")
    if device.type == "cpu":
        print(f"process peak RSS before the benchmark (the libraries): {peak_rss_mib():.0f} MiB; "
              f"freed memory kept for reuse (plumbing.keep_freed_memory): {freed_memory_kept}")
    # The global loss scores all N*B samples against all N*B on every rank; the local, its B rows.
    world_batch = args.world_size * args.batch_size
    mib = 4 / 2**20  # an fp32 logit
    print(f"loss logits per rank at world size {args.world_size} x batch {args.batch_size}, fp32: "
          f"global {world_batch}x{world_batch} = {world_batch ** 2 * mib:.2f} MiB, "
          f"local {args.batch_size}x{world_batch} = {args.batch_size * world_batch * mib:.2f} MiB")


def main(argv=None):
    args = parse_args(argv)
    if args.checks:
        return checks_overhead()
    if args.table_rows:
        return table_memory(args.table_rows, args.workers)
    if args.input_pipeline:
        return input_pipeline(args.frames, args.gpu_samples_per_s, args.seed)
    if args.ddp:
        return reduction_cost(args)
    train_args = as_train_args(args)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    train.seed_everything(args.seed, args.deterministic)  # first: it sets cuBLAS's workspace
    freed_memory_kept = plumbing.keep_freed_memory(device)
    cfg = bench_config(args)
    print_setup(args, cfg, device, freed_memory_kept)
    peak_size = args.peak_size or (8192 if device.type == "cuda" else 2048)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    peak_now = peak_meter(device, dtype, peak_size)
    peak = peak_now(10)
    print(f"peak: {peak / 1e9:.1f} GFLOP/s ({peak_size}x{peak_size} {args.precision} matmuls, "
          "the fastest of 10)")
    flops = model_flops(cfg, args.batch_size)
    print(f"model FLOPs: {flops / 1e9:.2f} GFLOP per step of {args.batch_size} "
          f"({flops / args.batch_size / 1e9:.3f} per sample, forward + backward)")

    raw_model = CLIP(cfg).to(device).train()
    raw_model.set_grad_checkpointing(args.grad_checkpointing)
    print(f"{sum(p.numel() for p in raw_model.parameters()) / 1e6:.2f} M parameters")
    optimizer = train.make_optimizer(raw_model, train_args)
    model = raw_model
    if args.compile:
        print("compiling the model with torch.compile (in the warm-up steps) ...")
        model = torch.compile(raw_model)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    # --- 1. synthetic tensors: the model, the loss and the optimizer, nothing else
    batches = itertools.repeat(synthetic_batch(cfg, args.batch_size, device))
    step = training_step(model, raw_model, optimizer, train_args, autocast, batches, device)
    try:
        synthetic_rate, mfu_now = measure("synthetic", step, args, flops, peak, device, peak_now)
    except Exception as e:
        if not args.compile:
            raise
        raise compile_failure(e)

    # --- 2. the data pipeline alone, then training on it
    loader = demo_loaders(cfg, train_args, device)
    images_per_s = data_pipeline_rate(loader, args.batch_size, args.workers, args.steps)
    per = "worker" if args.workers else "main process"
    print(f"data pipeline alone: {images_per_s:.1f} images/s decoded + augmented + tokenised "
          f"({images_per_s / max(1, args.workers):.1f} per {per})")
    batches = loader(args.warmup + args.steps)
    step = training_step(model, raw_model, optimizer, train_args, autocast, batches, device)
    pipeline_rate, _ = measure("real pipeline", step, args, flops, peak, device)
    # A shared machine's speed drifts (other tenants, clocks): the peak again tells drift apart.
    peak_after = peak_now(10)
    pipeline_mfu = flops / args.batch_size * pipeline_rate / peak_after
    print(f"peak again at the end: {peak_after / 1e9:.1f} GFLOP/s "
          f"({100 * (peak_after / peak - 1):+.0f}% drift); "
          f"the real pipeline's MFU against it: {100 * pipeline_mfu:.1f}%, its "
          f"samples/s {100 * pipeline_rate / synthetic_rate:.0f}% of the synthetic figure")

    print("| device | dtype | batch | samples/s synthetic | samples/s pipeline "
          "| MFU synthetic, peak after each step |")
    print(f"| {device_name(device)} ({device.type}, {torch.get_num_threads()} threads) "
          f"| {args.precision} | {args.batch_size} | {synthetic_rate:.1f} | {pipeline_rate:.1f} "
          f"| {100 * mfu_now:.1f}% |")


if __name__ == "__main__":
    plumbing.run_main(main)
