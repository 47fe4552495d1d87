"""What QUILT-1M's input costs: the table's memory per million rows, in the trainer and in its
forked loader workers.

QUILT-1M is 1,017,712 rows of 13 columns; this writes a table of that shape (captions of 8-60
words) with as many rows as asked, reads it as train.py does, and forks workers that touch every
row, as an epoch does. It prints the bytes of the table, its cost per million rows, and the
workers' proportional set size (PSS: shared pages count 1/n to each of their n sharers) before
and after the epoch: a table that each worker copied would show up there.

    python bench_input.py --table-rows 200000 --workers 4
"""
import argparse
import csv
import multiprocessing
import os
import sys
import tempfile
import time

import numpy as np
import torch

import bench
import data
import plumbing
from plumbing import UsageError

WORDS = ("tissue", "nuclei", "stroma", "gland", "mitotic", "figure", "carcinoma", "benign",
         "lymphocytes", "necrosis", "eosinophilic", "cytoplasm", "at", "high", "power", "we",
         "see", "the", "a", "of", "with", "and", "this", "is", "pleomorphic", "infiltrating")


# ----------------------------------------------------------------------------- a QUILT-shaped table

def write_quilt_shaped_csv(path, rows, seed=0):
    """A CSV of QUILT-1M's 13 columns and `rows` rows: captions of 8 to 60 words, video-frame
    paths and sizes, 90% train and 10% val. A second or two per 100,000 rows."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(8, 61, rows)  # words per caption
    picked = rng.integers(0, len(WORDS), lengths.sum())
    # One long text; caption i is a slice of it, cut at a space: no per-word Python work.
    text = " ".join(WORDS[i] for i in picked.tolist()) + " "
    word_ends = np.cumsum(np.array([len(word) + 1 for word in WORDS])[picked])
    caption_ends = word_ends[np.cumsum(lengths) - 1].tolist()
    caption_starts = [0] + caption_ends[:-1]
    frame_sizes = [(640, 360), (1280, 720), (1920, 1080)]
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


# ----------------------------------------------------------------------------- memory

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
    characters = 0
    for index in range(len(rows)):
        path, caption = rows[index]
        characters += len(path) + len(caption)
    barrier.wait()
    connection.send((before, pss_bytes(), characters))
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
        before, after, _ = receiver.recv()
        process.join()
        measured.append((before, after))
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
    """Print the table's bytes, per million rows, and what an epoch in the workers adds."""
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
          f"({(read - written) / len(rows) * 1e12 / 1e6:.1f} s per million)")
    print(f"table memory: {rows.nbytes / 2**20:.1f} MiB for {len(rows):,} rows "
          f"({text_bytes / 2**20:.1f} MiB of UTF-8 paths and captions, the rest offsets) + "
          f"{sizes.nbytes / 2**20:.1f} MiB of sizes = {per_million / 2**20:.0f} MiB per million "
          "rows, once per node")
    if not sys.platform.startswith("linux"):
        print("workers: PSS is read from /proc, Linux only; skipped")
        return
    measured = epoch_in_workers(rows, workers)
    growth = max(after - before for before, after in measured)
    print(f"workers: {workers} forked, each touched every row; the largest PSS growth of one "
          f"worker {growth / 2**20:.1f} MiB ({growth / rows.nbytes:.1%} of the table)")
    peak = loader_epoch_memory(rows, workers)
    print(f"an epoch of the sampler and DataLoader ({workers} workers, no images): peak PSS of "
          f"the trainer and its workers {peak / 2**20:.1f} MiB; the trainer's peak RSS "
          f"{bench.peak_rss_mib():.1f} MiB; UTF-8 paths + captions {text_bytes} bytes")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table-rows", type=int, default=200_000,
                        help="rows of the QUILT-shaped table (QUILT-1M: 1,017,712)")
    parser.add_argument("--workers", type=int, default=2, help="forked workers touching it")
    args = parser.parse_args(argv)
    if args.table_rows < 1 or args.workers < 0:
        raise UsageError("--table-rows must be at least 1, --workers at least 0.")
    table_memory(args.table_rows, args.workers)


if __name__ == "__main__":
    plumbing.run_main(main)
