"""Train CLIP on image-caption pairs with torchrun, reproducibly.

The demo (a synthetic H&E dataset generated on first use, the `tiny` model, a few minutes on 2 CPU cores):
    torchrun --standalone --nproc_per_node=2 train.py
    python train.py                                   # the same, as one process
QUILT-1M on one node of 8 GPUs:
    torchrun --standalone --nproc_per_node=8 train.py --model ViT-B-32 --train-data quilt_1M_lookup.csv \
        --image-root /data/quilt_1m --batch-size 256 --epochs 40 --warmup 2000 --workers 8 --precision bf16
Several nodes (run on each node, with its own --node_rank):
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --nnodes=4 --nproc_per_node=8 --node_rank=$NODE_RANK \
        --rdzv_backend=c10d --rdzv_endpoint=$MASTER_HOST:29500 --rdzv_id=quilt train.py --model ViT-B-32 ...
Resume an interrupted run bit-exactly: add `--resume auto --output-dir runs/THAT_RUN`.

The contrastive loss over all ranks is written out below; its docstring has the gradient table that
tells what --local-loss and --gather-with-grad really compute.
"""
import argparse
import contextlib
import ctypes
import datetime
import hashlib
import json
import math
import os
import platform
import random
import subprocess
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import demo_data
import evaluate
import plumbing
from model import CLIP, model_config, read_weights_file, run_tokenizer_folder
from plumbing import UsageError


# ----------------------------------------------------------------------------- the distributed loss

class GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sends every rank's gradient back to the rank that owns the slice.

    Rank r's loss depends on every rank's features, so the gradient of the *total* loss with respect to rank r's
    slice is the sum over ranks of their local gradients for that slice: all-reduce-sum, then keep our own slice.
    """

    @staticmethod
    def forward(ctx, tensor):                                   # (B, D) -> (world * B, D)
        ctx.rank, ctx.batch = dist.get_rank(), tensor.shape[0]
        return torch.cat(all_gather(tensor))

    @staticmethod
    def backward(ctx, grad):                                    # (world * B, D) -> (B, D)
        grad = grad.contiguous().clone()  # autograd may hand us a strided or shared buffer
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.batch:(ctx.rank + 1) * ctx.batch]


def all_gather(tensor):
    """[rank 0's tensor, rank 1's, ...]: plain copies, which carry no gradient."""
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return gathered


def gather_features(features, gather_with_grad):
    if gather_with_grad:
        return GatherWithGrad.apply(features)
    gathered = all_gather(features)
    # All-gather returns tensors without grad; put our own slice back so that its gradient flows
    # (the other ranks' slices stay constants here: their gradients are computed on their ranks).
    gathered[dist.get_rank()] = features
    return torch.cat(gathered)


def contrastive_loss(image_features, text_features, logit_scale, local_loss=False, gather_with_grad=True):
    """CLIP's symmetric InfoNCE over the global batch of all ranks (OpenCLIP's ClipLoss semantics).

    image_features, text_features: (B, D), L2-normalised, this rank's samples; logit_scale: exp(.) done.
    local_loss: each rank scores only its own B rows against all N*B columns (memory B x N*B instead of
    N*B x N*B). gather_with_grad: gradients flow through the gathered features of other ranks.

    What the gradient is, compared with one process computing the loss on the concatenated batch, once
    DDP has averaged gradients over the N ranks (proved in tests/test_loss.py, float64, N = 2 and 3):

        local_loss  gather_with_grad | encoder gradients          | logit_scale gradient
        False       True  (default)  | equal                      | equal
        True        True             | equal                      | equal
        False       False            | exactly 1/N of the truth   | equal
        True        False            | biased: not proportional   | biased

    RULE 4: the default is the global loss with gradient through the gather, the exact gradient.
    Without gather_with_grad each rank drops the terms where other ranks' samples act as negatives for its own;
    with a global loss that is a uniform 1/N (just a smaller learning rate), but with a local loss it is a
    different, biased objective: a likely mechanism for the study's finding that the global loss trains more stably.
    """
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    batch = image_features.shape[0]
    all_image, all_text, offset = image_features, text_features, 0
    if world > 1:
        all_image = gather_features(image_features, gather_with_grad)  # (N*B, D)
        all_text = gather_features(text_features, gather_with_grad)
        offset = dist.get_rank() * batch
    if local_loss:
        logits_per_image = logit_scale * image_features @ all_text.T   # (B, N*B)
        logits_per_text = logit_scale * text_features @ all_image.T
        labels = torch.arange(batch, device=image_features.device) + offset
    else:
        logits_per_image = logit_scale * all_image @ all_text.T        # (N*B, N*B)
        logits_per_text = logits_per_image.T
        labels = torch.arange(all_image.shape[0], device=image_features.device)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


# ----------------------------------------------------------------------------- flags

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--train-data", default=None, help="CSV/TSV of image paths and captions (default: the demo dataset)")
    a("--image-root", default=None, help="folder the CSV's image paths are relative to (default: the CSV's folder)")
    a("--csv-img-key", default="image_path", help="image path column (QUILT-1M's name)")
    a("--csv-caption-key", default="caption", help="caption column")
    a("--csv-separator", default=None, help="default: tab for .tsv, comma otherwise")
    a("--model", default="tiny", help="tiny, ViT-B-32, ViT-B-16, or an OpenCLIP model-config JSON")
    a("--tokenizer", default=None, help="local HF tokenizer folder (default: train a BPE on the captions)")
    a("--pretrained", default=None, help="start from these weights: ours, OpenAI, OpenCLIP or a HF CLIPModel folder")
    a("--batch-size", type=int, default=64, help="per process; global batch = this x world size x accum-steps")
    a("--accum-steps", type=int, default=1, help="micro-batches per step, with the contrastive loss over all")
    a("--epochs", type=int, default=16, help="the demo default: about 3 minutes on 2 CPU cores")
    a("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    a("--lr", type=float, default=5e-4, help="OpenCLIP's ViT default; RULE 6: stay at or above 5e-5")
    a("--wd", type=float, default=0.2, help="AdamW weight decay, not applied to gains, biases, logit_scale")
    a("--warmup", type=int, default=None, help="linear warm-up steps (default: 10%% of the run, at most 10000)")
    a("--beta1", type=float, default=0.9)
    a("--beta2", type=float, default=0.98)
    a("--eps", type=float, default=1e-6)
    a("--grad-clip-norm", type=float, default=None)
    a("--precision", choices=["fp32", "bf16"], default=None,
      help="bf16 = autocast, weights stay fp32 (default: bf16 where the hardware has it natively, else fp32)")
    a("--workers", type=int, default=2, help="data-loader processes per rank (results do not depend on it)")
    a("--seed", type=int, default=0)
    a("--rrc-scale", type=float, default=0.8, help="RandomResizedCrop lower scale; RULE 5: 0.7-0.8")
    a("--local-loss", action=argparse.BooleanOptionalAction, default=False)
    a("--gather-with-grad", action=argparse.BooleanOptionalAction, default=True)
    a("--deterministic", action=argparse.BooleanOptionalAction, default=True,
      help="deterministic kernels (RULE 7); --no-deterministic trades them for speed")
    a("--grad-checkpointing", action="store_true", help="recompute activations in backward to save memory")
    a("--output-dir", default=None, help="run folder (default: runs/<model>-seed<seed>-<time>)")
    a("--save-every", type=int, default=None, help="checkpoint every N steps (default: once per epoch)")
    a("--log-every", type=int, default=10)
    a("--resume", default=None, help="'auto' (newest valid checkpoint in --output-dir) or a checkpoint path")
    a("--bad-samples", choices=["error", "skip"], default="error",
      help="an unreadable image or empty caption stops the run (error) or is left out, decided before training (skip)")
    a("--check-data", action="store_true", help="read every image once before training and list the bad rows")
    a("--max-image-pixels", type=int, default=89_478_485, help="refuse larger images (decompression bombs)")
    a("--allow-absolute-paths", action="store_true", help="let CSV image paths leave --image-root")
    a("--jpeg-draft", action="store_true", help="decode large JPEGs at a reduced scale: a faster loader, other pixels")
    a("--compile", action="store_true", help="torch.compile the model (GPU: +12%% on ViT-B-32 bf16; CPU: no gain)")
    a("--skip-nonfinite", type=int, default=0, help="skip up to N steps whose loss is not finite, instead of stopping")
    args = p.parse_args(argv)
    for ok, message in [(args.batch_size >= 1, "--batch-size must be at least 1"),
                        (args.accum_steps >= 1, "--accum-steps must be at least 1"),
                        (args.epochs >= 1, "--epochs must be at least 1"),
                        (args.max_steps is None or args.max_steps >= 1, "--max-steps must be at least 1"),
                        (0 < args.rrc_scale <= 1, "--rrc-scale must lie in (0, 1]"),
                        (args.lr > 0, "--lr must be positive"),
                        (args.workers >= 0, "--workers cannot be negative"),
                        (args.resume != "auto" or args.output_dir, "--resume auto needs the --output-dir of the run")]:
        if not ok:
            raise UsageError(f"{message}.")
    if args.lr < 5e-5:
        print(f"warning: --lr {args.lr} is below 5e-5, which the study found degrades every dataset (RULE 6).")
    if args.local_loss and not args.gather_with_grad:
        print("warning: --local-loss without --gather-with-grad optimises a biased objective (see contrastive_loss).")
    return args


# ----------------------------------------------------------------------------- set-up

def seed_everything(seed, deterministic):
    # RULE 1: seed python, numpy and torch (CPU and every GPU) with the run's seed, on every rank, so
    # that the model is initialised identically everywhere.
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # RULE 7: deterministic kernels. cuBLAS reads its workspace setting when CUDA starts, so it is set
    # here, before any CUDA work; TF32 changes matmul results, so it is off.
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cuda.matmul.allow_tf32 = not deterministic
    torch.backends.cudnn.allow_tf32 = not deterministic


def default_precision(device):
    """bf16 autocast where the hardware multiplies bf16 natively: GPUs since Ampere, CPUs with AMX or
    AVX512-BF16. On this project's 2-core CPUs it trains the demo 1.9-2.2x faster than fp32 with the same
    zero-shot accuracy (see README); elsewhere bf16 would be emulated and slow, so fp32."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    cpu_flags = open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else []
    return "bf16" if {"amx_bf16", "avx512_bf16"} & set(cpu_flags) else "fp32"


def cosine_lr(step, base_lr, warmup, total_steps):
    """Linear warm-up, then cosine decay to 0 (OpenCLIP's schedule)."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup))) * base_lr


def make_optimizer(model, args):
    # No weight decay on gains, biases, the class token and logit_scale (parameters of < 2 dims), as OpenCLIP.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": args.wd},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    # The fused kernel (one launch for all tensors) is much faster on CUDA and on CPU alike.
    return torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps, fused=True)


def weights_sha256(state_dict):
    """A fingerprint of the weights alone: names, dtypes, shapes and bytes, in a fixed order."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------- checkpoints and the manifest

def rng_states():
    return {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np.random.get_state()[1].copy()),
            "numpy_pos": int(np.random.get_state()[2]), "python": list(random.getstate()[1]),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states):
    torch.set_rng_state(states["torch"])
    np.random.set_state(("MT19937", states["numpy"].numpy(), states["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(states["python"]), None))
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(run_dir, checkpoint, keep=2):
    """checkpoints/step_<N>.pt, then latest.pt pointing at it; older step files beyond `keep` go."""
    folder = os.path.join(run_dir, "checkpoints")
    path = os.path.join(folder, f"step_{checkpoint['step']}.pt")
    plumbing.atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))
    def link_latest(tmp):  # a hard link costs no second copy; fall back to a copy where links fail
        try:
            os.link(path, tmp)
        except OSError:
            torch.save(checkpoint, tmp)
    plumbing.atomic_write(os.path.join(folder, "latest.pt"), link_latest)
    for old in [p for _, p in sorted(step_checkpoints(folder))[:-keep]]:
        os.remove(old)


def step_checkpoints(folder):
    """[(step, path)] of the step_<N>.pt files in `folder`."""
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return [(int(n[5:-3]), os.path.join(folder, n)) for n in names
            if n.startswith("step_") and n.endswith(".pt") and n[5:-3].isdigit()]


def find_resume_checkpoint(run_dir):
    """The newest step checkpoint that loads; a damaged one (e.g. a dying disk) is skipped with a note."""
    for step, path in sorted(step_checkpoints(os.path.join(run_dir, "checkpoints")), reverse=True):
        try:
            return path, read_weights_file(path)
        except UsageError as e:
            print(f"warning: skipping {e}")
    return None, None


# ----------------------------------------------------------------------------- training

def train_step(model, micro_batches, args, autocast):
    """Forward and backward of one global batch; returns the loss (detached).

    With --accum-steps K the loss still spans all K micro-batches (all negatives), as OpenCLIP's
    --accum-freq: first embed every micro-batch without gradient, then recompute each one with
    gradient against the cached rest and backpropagate. The K backward passes add up to the exact
    gradient of the one big batch; logit_scale takes part in all K, so its gradient is scaled by 1/K.
    """
    K = len(micro_batches)
    cached = [None]  # with one micro-batch there is no rest to cache
    if K > 1:
        with torch.no_grad(), autocast:
            cached = [model(images, tokens)[:2] for images, tokens in micro_batches]
    for k, (images, tokens) in enumerate(micro_batches):
        # DDP all-reduces gradients only after the last micro-batch.
        sync = model.no_sync() if k < K - 1 and hasattr(model, "no_sync") else contextlib.nullcontext()
        with sync:
            with autocast:
                image_features, text_features, logit_scale = model(images, tokens)
                all_image = torch.cat([image_features if i == k else c[0] for i, c in enumerate(cached)])
                all_text = torch.cat([text_features if i == k else c[1] for i, c in enumerate(cached)])
                # The same value, with its gradient multiplied by 1/K (by exactly 1 when K = 1).
                logit_scale = logit_scale.detach() + (logit_scale - logit_scale.detach()) * (1 / K)
                loss = contrastive_loss(all_image, all_text, logit_scale, local_loss=args.local_loss,
                                        gather_with_grad=args.gather_with_grad)
            loss.backward()  # outside autocast, as PyTorch advises
    return loss.detach()


def optimizer_step(model, optimizer, args):
    """After train_step: clip (if asked), step, clear the gradients, clamp the temperature."""
    if args.grad_clip_norm:
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.clamp_logit_scale()


def make_run_dir(args):
    """The run folder, the same on every rank; a folder with checkpoints is only continued with --resume."""
    run_dir = args.output_dir or plumbing.gather_objects(os.path.join(
        "runs", f"{os.path.basename(args.model).removesuffix('.json')}-seed{args.seed}-"
        f"{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"))[0]
    if not args.resume and step_checkpoints(os.path.join(run_dir, "checkpoints")):
        raise UsageError(f"{run_dir} already holds checkpoints: pass --resume auto to continue it, or another --output-dir.")
    try:
        os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
    except OSError as e:
        raise UsageError(f"--output-dir {run_dir}: cannot create it ({e.strerror}). Choose a writable folder.")
    return run_dir


def usable_samples(args, rows, image_root, run_dir, rank, world):
    """Row indices to train on, decided before training and identical on every rank."""
    data.check_paths(rows, image_root, args.train_data, args.allow_absolute_paths)
    if not (args.check_data or args.bad_samples == "skip"):
        return range(len(rows))
    # Each rank reads its share of the images (with its workers); everybody gets the whole list.
    parts = plumbing.gather_objects(data.find_bad_samples(rows, range(rank, len(rows), world), image_root, args.workers,
                                                 args.max_image_pixels))
    bad = {index: reason for part in parts for index, reason in part.items()}
    if rank == 0:
        plumbing.write_json(os.path.join(run_dir, "bad_samples.json"), {f"data row {i + 1}": bad[i] for i in sorted(bad)})
    if bad and args.bad_samples == "error":
        first = min(bad)
        raise UsageError(f"{args.train_data}: {len(bad)} bad rows; data row {first + 1} ({rows[first][0]}): "
                         f"{bad[first]}. All are in {run_dir}/bad_samples.json: fix them or pass --bad-samples skip.")
    return [i for i in range(len(rows)) if i not in bad]


def load_tokenizer_and_model(args, rows, run_dir, is_main):
    # Weights bring their own sizes (--model names a preset or config otherwise) and need the tokenizer
    # they were trained with: one of our run checkpoints finds its run's; published weights name theirs.
    if args.pretrained and not args.tokenizer:
        args.tokenizer = run_tokenizer_folder(args.pretrained)
        if not args.tokenizer:
            raise UsageError(f"--pretrained {args.pretrained} is not one of our run checkpoints: pass --tokenizer DIR, "
                             "the tokenizer folder published with these weights (vocab.json + merges.txt).")
    model = CLIP.from_pretrained(args.pretrained).train() if args.pretrained else None
    cfg = model.config if model else model_config(args.model)
    # Every run keeps its tokenizer in RUN/tokenizer, where evaluation, export and fine-tuning look for it.
    tokenizer_dir = os.path.join(run_dir, "tokenizer")
    if is_main and not os.path.isdir(tokenizer_dir):
        if args.tokenizer:
            plumbing.atomic_write(tokenizer_dir, data.load_tokenizer(args.tokenizer).save_pretrained)
        else:
            data.train_tokenizer([caption for _, caption in rows], tokenizer_dir, cfg.vocab_size)
    plumbing.barrier()
    tokenizer = data.load_tokenizer(tokenizer_dir)
    if not args.tokenizer and not model:
        cfg.vocab_size = len(tokenizer)  # our BPE may stop short of the requested size
    elif len(tokenizer) > cfg.vocab_size:
        weights = f"--pretrained {args.pretrained}" if args.pretrained else f"--model {args.model}"
        raise UsageError(f"--tokenizer {args.tokenizer} has {len(tokenizer)} tokens; {weights} "
                         f"embeds only {cfg.vocab_size}.")
    torch.manual_seed(args.seed)  # RULE 1: the initial weights depend on the seed alone, whatever ran before
    return tokenizer, model or CLIP(cfg)


def next_micro_batches(batches, accum_steps, device):
    """The next global batch's micro-batches on `device`; a bad sample stops the run with its row."""
    micro_batches = []
    for _ in range(accum_steps):
        batch = next(batches)
        if isinstance(batch, data.BadSample):
            raise UsageError(batch.message)
        micro_batches.append([t.to(device, non_blocking=True) for t in batch])
    return micro_batches


def main(argv=None):
    args = parse_args(argv)
    started = time.time()
    rank, world, device = plumbing.setup_distributed()
    is_main = rank == 0
    seed_everything(args.seed, args.deterministic)
    plumbing.keep_freed_memory(device)
    args.precision = args.precision or default_precision(device)

    # --- the run folder and the data; the demo dataset is generated by rank 0 while the others wait
    run_dir = make_run_dir(args)
    if is_main:
        plumbing.remove_leftovers(run_dir)  # of writes a killed run left midway (checkpoints, tokenizer, manifest, log)
    if args.train_data is None:
        if is_main:
            demo_data.ensure_demo_data()
        plumbing.barrier()
        args.train_data = demo_data.ensure_demo_data()
    image_root = args.image_root or os.path.dirname(os.path.abspath(args.train_data))
    rows = data.read_csv(args.train_data, args.csv_img_key, args.csv_caption_key, args.csv_separator)
    samples = usable_samples(args, rows, image_root, run_dir, rank, world)
    tokenizer, model = load_tokenizer_and_model(args, rows, run_dir, is_main)
    cfg = model.config
    model = model.to(device)
    model.set_grad_checkpointing(args.grad_checkpointing)
    optimizer = make_optimizer(model, args)

    # --- the schedule: every number here is a function of the flags and the dataset size
    global_batch = args.batch_size * world * args.accum_steps
    steps_per_epoch = len(samples) // global_batch
    if steps_per_epoch == 0:
        raise UsageError(f"{args.train_data} has {len(samples)} usable rows, fewer than one global batch of "
                         f"{global_batch} (--batch-size {args.batch_size} x {world} processes x "
                         f"--accum-steps {args.accum_steps}). Lower --batch-size.")
    total_steps = min(args.epochs * steps_per_epoch, args.max_steps or math.inf)
    warmup = args.warmup if args.warmup is not None else min(10_000, total_steps // 10)
    save_every = args.save_every or steps_per_epoch

    checkpoint_path, checkpoint = (find_resume_checkpoint(run_dir) if args.resume == "auto" else
                                   (args.resume, args.resume and read_weights_file(args.resume)))
    start_step, skipped = (checkpoint["step"], checkpoint["skipped_steps"]) if checkpoint else (0, [])
    if checkpoint:
        # RULE 8: resume restores everything that decides the future: weights, optimizer moments,
        # the step (which fixes the schedule and the sampler's position) and the random states.
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        set_rng_states(checkpoint["rng"])
        if is_main:
            print(f"resuming from {checkpoint_path} at step {start_step}")
    # static_graph lets DDP plan its all-reduces once; --accum-steps's no-grad caching pass changes the graph.
    ddp_model = DDP(model, gradient_as_bucket_view=True, static_graph=args.accum_steps == 1) if world > 1 else model
    ddp_model = torch.compile(ddp_model) if args.compile else ddp_model  # compile after DDP, as PyTorch advises

    dataset = data.CsvDataset(rows, image_root, tokenizer, cfg.image_size, cfg.context_length,
                              args.rrc_scale, args.seed, args.max_image_pixels, args.jpeg_draft)
    sampler = data.GlobalBatchSampler(samples, args.batch_size, world, rank, args.accum_steps,
                                      args.seed, total_steps, start_step)
    loader = data.make_train_loader(dataset, sampler, args.workers, args.seed, device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    # --- RULE 9: the manifest records everything that could change a result
    manifest_path, log_path = os.path.join(run_dir, "manifest.json"), os.path.join(run_dir, "log.jsonl")
    if is_main:
        manifest = json.load(open(manifest_path)) if checkpoint and os.path.exists(manifest_path) else {}
        manifest.update({
            "args": vars(args), "command": " ".join(sys.argv), "model_config": vars(cfg), "seed": args.seed,
            "world_size": world, "global_batch_size": global_batch, "steps_per_epoch": steps_per_epoch,
            "total_steps": total_steps, "warmup_steps": warmup,
            "train_data": {"path": os.path.abspath(args.train_data), "rows": len(rows), "bad_rows": len(rows) - len(samples),
                           "sha256": plumbing.file_sha256(args.train_data)},
            "tokenizer": {"path": os.path.abspath(args.tokenizer or os.path.join(run_dir, "tokenizer")), "vocab_size": len(tokenizer),
                          "sha256": data.tokenizer_fingerprint(tokenizer)},
            "determinism": {"deterministic": args.deterministic, "tf32": torch.backends.cuda.matmul.allow_tf32,
                            "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
                            "cudnn_benchmark": torch.backends.cudnn.benchmark},
            **plumbing.environment(device),
            "started": manifest.get("started", datetime.datetime.now().isoformat()),
        })
        plumbing.write_json(manifest_path, manifest)
        if os.path.exists(log_path):  # lines a killed run wrote after its last checkpoint are redone
            lines = [line for line in open(log_path) if json.loads(line)["step"] <= start_step]
            plumbing.atomic_write(log_path, lambda tmp: open(tmp, "w").writelines(lines))
        print(f"run folder {run_dir}: {len(samples)} pairs, {world} process(es) x {args.batch_size} x "
              f"{args.accum_steps} = global batch {global_batch}, {total_steps} steps")

    # --- the loop
    from tqdm import tqdm
    progress = tqdm(total=total_steps, initial=start_step, disable=not is_main, dynamic_ncols=True, mininterval=2)
    batches, tick = iter(loader), time.time()
    no_bad_step = total_steps + 1
    first_bad_step = torch.tensor(no_bad_step, device=device)  # tracked on the device: no sync per step
    for step in range(start_step, total_steps):
        lr = cosine_lr(step, args.lr, warmup, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = train_step(ddp_model, next_micro_batches(batches, args.accum_steps, device), args, autocast)
        done, finite = step + 1, torch.isfinite(loss)
        if args.skip_nonfinite and not plumbing.min_over_ranks(finite):  # deciding costs a sync per step: only when asked
            skipped.append(done)
            optimizer.zero_grad(set_to_none=True)
            if len(skipped) > args.skip_nonfinite:
                raise UsageError(f"non-finite loss at steps {skipped}, more than --skip-nonfinite "
                                 f"{args.skip_nonfinite}; the last good checkpoint is kept in {run_dir}/checkpoints.")
        else:
            first_bad_step = torch.minimum(first_bad_step, torch.where(finite, no_bad_step, done))
            optimizer_step(model, optimizer, args)
        progress.update()

        log_now, save_now = done % args.log_every == 0 or done == total_steps, done % save_every == 0 or done == total_steps
        if log_now or save_now:  # the only synchronisations in the loop; never save a non-finite model
            if plumbing.min_over_ranks(first_bad_step).item() != no_bad_step:
                raise UsageError(f"the loss was not finite at step {first_bad_step.item()}; the last good "
                                 f"checkpoint is kept in {run_dir}/checkpoints. Lower --lr, set --grad-clip-norm, "
                                 "or pass --skip-nonfinite N.")
        if log_now:
            if world > 1:
                dist.all_reduce(loss)  # a sum: gloo has no average
                loss = loss / world
            record = {"step": done, "epoch": step // steps_per_epoch, "loss": loss.item(), "lr": lr,
                      "logit_scale": model.logit_scale.exp().item(),
                      "samples_per_s": args.log_every * global_batch / (time.time() - tick)}
            tick = time.time()
            if is_main:
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                progress.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}")
        if save_now:
            if is_main:
                save_checkpoint(run_dir, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                          "step": done, "epoch": done // steps_per_epoch, "config": vars(cfg),
                                          "args": vars(args), "rng": rng_states(), "skipped_steps": skipped})
            plumbing.barrier()  # nobody runs ahead of a checkpoint that may be needed to resume
    progress.close()

    # --- the end: fingerprint the weights, close the manifest, and score the demo
    if is_main:
        sha = weights_sha256(model.state_dict())
        print(f"final weights sha256 {sha}")
        manifest.update({"final_weights_sha256": sha, "finished": datetime.datetime.now().isoformat(),
                         "wall_time_s": round(time.time() - started, 1), "skipped_nonfinite_steps": skipped})
        if os.path.abspath(args.train_data) == os.path.abspath(os.path.join(demo_data.DEMO_DIR, "train.csv")):
            manifest["demo_zero_shot"] = evaluate.demo_zero_shot(model, tokenizer, device)
        plumbing.write_json(manifest_path, manifest)
    if dist.is_initialized():
        dist.destroy_process_group()
    return model


if __name__ == "__main__":
    plumbing.run_main(main)
