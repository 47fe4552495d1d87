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
import itertools
import math
import os
import statistics
import tempfile
from dataclasses import replace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import train
from model import CLIP, model_config
from support import demo_data
from support.bench_data import (checks_overhead, fingerprint_cost, input_pipeline,
                                table_memory)
from support.errors import UsageError, run_main
from support.machine import keep_freed_memory
from support.measure import (held_bytes, measure, peak_meter, print_setup, print_summary_row,
                             time_steps)
from support.tree_all_reduce import tree_all_reduce_hook


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


def training_step(model, raw_model, optimizer, train_args, autocast, batches, device):
    """One optimizer step as train.py's loop takes it (without the lr schedule and logging)."""
    def step():
        micro_batches = data.next_micro_batches(batches, 1, device)
        train.train_step(model, micro_batches, train_args, autocast)
        train.optimizer_step(raw_model, optimizer, train_args)
    return step


def synthetic_batch(cfg, batch_size, device):
    """Random pixels and token ids, already on the device: a step with no data loading at all."""
    images = torch.randn(batch_size, 3, cfg.image_size, cfg.image_size, device=device)
    tokens = torch.randint(1, cfg.vocab_size - 1, (batch_size, cfg.context_length), device=device)
    tokens[:, -1] = cfg.vocab_size - 1  # end-of-text, the largest id: where the text tower pools
    return images, tokens


# ----------------------------------------------------------------------------- flags

OVERRIDES = {"--image-size": "image_size", "--patch-size": "patch_size", "--width": "vision_width",
             "--layers": "vision_layers", "--text-width": "text_width",
             "--text-layers": "text_layers", "--context-length": "context_length",
             "--vocab-size": "vocab_size", "--embed-dim": "embed_dim"}
# The cores this process may use (fewer than the machine's, if pinned).
ALL_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
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
    a("--fingerprint-rows", type=int, default=None,
      help="instead: time the manifest's images fingerprint on a QUILT-shaped CSV of this "
           "many rows")
    a("--ddp", type=int, default=0, metavar="N",
      help="instead: DDP steps on N gloo processes of one thread, DDP's all-reduce against "
           "train.py's tree hook, and the copies the tree holds under --accum-steps")
    a("--accum-steps", type=int, default=8,
      help="--ddp: micro-batches per step whose gradients' copies are measured")
    args = p.parse_args(argv)
    at_least_one = min(args.batch_size, args.steps, args.threads, args.world_size)
    if at_least_one < 1 or min(args.warmup, args.workers) < 0:
        raise UsageError("--batch-size, --steps, --threads and --world-size must be at least 1, "
                         "--warmup and --workers at least 0.")
    if args.table_rows is not None and args.table_rows < 1:
        raise UsageError("--table-rows must be at least 1.")
    if args.frames < 1 or not 0 < args.gpu_samples_per_s < math.inf:
        raise UsageError("--frames must be at least 1, --gpu-samples-per-s a positive number.")
    if args.accum_steps < 2 or args.accum_steps & (args.accum_steps - 1):
        raise UsageError("--accum-steps must be a power of two, at least 2: the tree's.")
    if args.ddp == 1 or args.ddp < 0:
        raise UsageError("--ddp N compares reductions over N >= 2 processes.")
    if args.ddp and (not args.deterministic or args.ddp & (args.ddp - 1)):
        # train.py uses the tree only where its bits are promised (RULE 3); elsewhere both
        # sides would be DDP's all-reduce.
        raise UsageError("--ddp N times the tree hook, which train.py uses only with "
                         "--deterministic on a power-of-two N: drop --no-deterministic or pick "
                         "N = 2, 4, 8.")
    return args


def bench_config(args):
    """--model, then the size flags on top of it."""
    overrides = {}
    for field in OVERRIDES.values():
        if getattr(args, field) is not None:
            overrides[field] = getattr(args, field)
    return replace(model_config(args.model), **overrides)


def as_train_args(args, more=()):
    """The Namespace train.py would run with, so that the optimizer and the loss are the users';
    `more`: flags on top."""
    flags = [*more, "--model", args.model, "--batch-size", args.batch_size,
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


# ----------------------------------------------------------------------------- the benchmark


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
    copies = accumulation_copies(args, world)
    if rank == 0:
        torch.save((times, copies), results)
    dist.destroy_process_group()


def accumulation_copies(args, world):
    """(the most bytes the tree hook held between backward passes over two steps of
    --accum-steps micro-batches, the bytes of all gradients): train.py's step and hook, with
    the hook's state measured after each call."""
    train_args = as_train_args(args, ["--accum-steps", args.accum_steps])
    raw_model = CLIP(bench_config(args)).train()
    model = DDP(raw_model, gradient_as_bucket_view=True)
    gradients = train.MicroBatchGradients(args.accum_steps)
    peak = []

    def measured_hook(state, bucket):
        future = tree_all_reduce_hook(state, bucket)
        peak.append(held_bytes(state))
        return future

    model.register_comm_hook(gradients, measured_hook)
    autocast = torch.autocast("cpu", enabled=False)
    batch = synthetic_batch(bench_config(args), args.batch_size, torch.device("cpu"))
    for _ in range(2):  # the first step's buckets are rebuilt after its first backward
        train.train_step(model, [batch] * args.accum_steps, train_args, autocast)
        raw_model.zero_grad(set_to_none=True)
    return max(peak), 4 * sum(p.numel() for p in raw_model.parameters())


def reduction_cost(args):
    """What train.py's tree reduction (RULE 3) costs a step, against DDP's all-reduce."""
    with tempfile.TemporaryDirectory() as folder:
        results = os.path.join(folder, "times.pt")
        rendezvous = os.path.join(folder, "rendezvous")
        mp.spawn(reduction_worker, args=(args.ddp, rendezvous, args, results), nprocs=args.ddp)
        times, (held, gradient_bytes) = torch.load(results, weights_only=True)
    plain = statistics.median(times["DDP's all-reduce"])
    tree = statistics.median(times["the tree hook"])
    print(f"{args.ddp} gloo processes x 1 thread, {args.model}, batch {args.batch_size} per "
          f"process, {args.precision}: step {1e3 * plain:.1f} ms with DDP's all-reduce, "
          f"{1e3 * tree:.1f} ms with the tree hook ({100 * (tree / plain - 1):+.1f}%; medians "
          f"of {len(times['the tree hook'])})")
    mib = 2**20
    print(f"--accum-steps {args.accum_steps}: the tree hook held at most {held / mib:.1f} MiB of "
          f"copies, {held / gradient_bytes:.2f} x the {gradient_bytes / mib:.1f} MiB of fp32 "
          f"gradients (log2 {args.accum_steps} = {math.log2(args.accum_steps):.0f})")


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
    if args.fingerprint_rows:
        return fingerprint_cost(args.fingerprint_rows, args.seed)
    train_args = as_train_args(args)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    train.seed_everything(args.seed, args.deterministic)  # first: it sets cuBLAS's workspace
    freed_memory_kept = keep_freed_memory(device)
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

    print_summary_row(args, device, synthetic_rate, pipeline_rate, mfu_now)


if __name__ == "__main__":
    run_main(main)
