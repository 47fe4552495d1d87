"""Stopwatches and meters: train.py's seconds per start-up phase; bench.py's step times with the
device synchronised, the peak matmul rate MFU is measured against, peak memory, the device's
name; the copies train.py's tree holds under accumulation; bench.py's set-up lines and its
summary row."""
import platform
import resource
import statistics
import sys
import time
from dataclasses import asdict

import torch

class Stopwatch:
    """Seconds per named phase of the start-up: on QUILT-1M's million rows, each phase that
    scales with the rows shows, printed at start and kept in the manifest."""

    def __init__(self):
        self.seconds = {}
        self.last = time.perf_counter()

    def lap(self, phase):
        """The time since the last lap is `phase`'s."""
        now = time.perf_counter()
        self.seconds[phase] = round(now - self.last, 3)
        self.last = now


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


def held_bytes(gradients):
    """The bytes of the copies that the micro-batches' trees hold now (each storage once)."""
    storages = {}
    for tree in gradients.trees.values():
        for _, subtree in tree.subtrees:
            storage = subtree.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def print_setup(args, cfg, device, freed_memory_kept):
    """Everything that decides the figures, and the loss's memory at --world-size."""
    print(f"device {device} ({device_name(device)}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads, {args.precision}, "
          f"deterministic {args.deterministic}, TF32 {torch.backends.cuda.matmul.allow_tf32}, "
          f"compile {args.compile}, grad checkpointing {args.grad_checkpointing}")
    print(f"model {args.model}: {asdict(cfg)}")
    if device.type == "cpu":
        print(f"process peak RSS before the benchmark (the libraries): {peak_rss_mib():.0f} MiB; "
              f"freed memory kept for reuse (keep_freed_memory): {freed_memory_kept}")
    # The global loss scores all N*B samples against all N*B on every rank; the local, its B rows.
    world_batch = args.world_size * args.batch_size
    mib = 4 / 2**20  # an fp32 logit
    print(f"loss logits per rank at world size {args.world_size} x batch {args.batch_size}, fp32: "
          f"global {world_batch}x{world_batch} = {world_batch ** 2 * mib:.2f} MiB, "
          f"local {args.batch_size}x{world_batch} = {args.batch_size * world_batch * mib:.2f} MiB")


def print_summary_row(args, device, synthetic_rate, pipeline_rate, mfu_now):
    """The figures as a row of docs/performance.md's tables, under its header."""
    print("| device | dtype | batch | samples/s synthetic | samples/s pipeline "
          "| MFU synthetic, peak after each step |")
    print(f"| {device_name(device)} ({device.type}, {torch.get_num_threads()} threads) "
          f"| {args.precision} | {args.batch_size} | {synthetic_rate:.1f} | {pipeline_rate:.1f} "
          f"| {100 * mfu_now:.1f}% |")
