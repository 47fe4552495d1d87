r"""Train CLIP on image-caption pairs with torchrun, reproducibly.

The demo (a synthetic H&E dataset generated on first use, the `tiny` model, a few minutes on 2 CPU
cores):
    torchrun --standalone --nproc_per_node=2 train.py
    python train.py                                   # the same, as one process
QUILT-1M on one node of 8 GPUs:
    torchrun --standalone --nproc_per_node=8 train.py --model ViT-B-32 \
        --train-data quilt_1M_lookup.csv --image-root /data/quilt_1m --batch-size 256 \
        --epochs 40 --warmup 2000 --workers 8 --precision bf16
Several nodes (run on each node, with its own --node_rank):
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --nnodes=4 --nproc_per_node=8 \
        --node_rank=$NODE_RANK --rdzv_backend=c10d --rdzv_endpoint=$MASTER_HOST:29500 \
        --rdzv_id=quilt train.py --model ViT-B-32 ...
Resume an interrupted run bit-exactly: add `--resume auto --output-dir runs/THAT_RUN`.

The contrastive loss over all ranks is written out first; its docstring has the gradient table
that tells what --local-loss and --gather-with-grad really compute. `main`, at the bottom, lists
the phases of a run.
"""
import argparse
import contextlib
import datetime
import io
import json
import math
import os
import random
import sys
import time
from typing import NamedTuple

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
from plumbing import UsageError, default_precision, make_run_dir, save_checkpoint


# ----------------------------------------------------------------------------- the distributed loss

class GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sends every rank's gradient back to the rank that owns the slice.

    Rank r's loss depends on every rank's features, so the gradient of the *total* loss with
    respect to rank r's slice is the sum over ranks of their local gradients for that slice:
    all-reduce-sum, then keep our own slice. With the global loss every rank computes the same
    loss from the same gathered features: the N gradients are N copies of the same bits, and
    their sum is our own slice times N, with no communication.
    """

    @staticmethod
    def forward(ctx, tensor, same_loss_on_every_rank):          # (B, D) -> (world * B, D)
        ctx.rank = dist.get_rank()
        ctx.batch = tensor.shape[0]
        ctx.same_loss = same_loss_on_every_rank
        return torch.cat(all_gather(tensor))

    @staticmethod
    def backward(ctx, grad):                                    # (world * B, D) -> (B, D)
        mine = slice(ctx.rank * ctx.batch, (ctx.rank + 1) * ctx.batch)
        if ctx.same_loss:
            # RULE 3: N x g is exact for N a power of two; g + g + g, added in the network's
            # order, need not even equal 3 x g.
            return grad[mine] * dist.get_world_size(), None
        grad = grad.contiguous().clone()  # autograd may hand us a strided or shared buffer
        dist.all_reduce(grad)
        return grad[mine], None


def all_gather(tensor):
    """[rank 0's tensor, rank 1's, ...]: plain copies, which carry no gradient."""
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return gathered


def gather_features(features, gather_with_grad, local_loss):
    """Every rank's features, (N*B, D), with or without a gradient path, as OpenCLIP gathers."""
    if gather_with_grad:
        # The global loss is the same on every rank; a local loss is each rank's own.
        return GatherWithGrad.apply(features, not local_loss)
    gathered = all_gather(features)
    # All-gather returns tensors without grad; for the global loss, put our own slice back so that
    # its gradient flows (the other ranks' slices stay constants: their ranks compute theirs).
    # OpenCLIP does not do this for a local loss, whose rows are our own features already.
    if not local_loss:
        gathered[dist.get_rank()] = features
    return torch.cat(gathered)


def contrastive_loss(image_features, text_features, logit_scale, local_loss=False,
                     gather_with_grad=True):
    """CLIP's symmetric InfoNCE over the global batch of all ranks (OpenCLIP's ClipLoss semantics).

    image_features, text_features: (B, D), L2-normalised, this rank's samples; logit_scale: exp(.)
    done. local_loss: each rank scores only its own B rows against all N*B columns (memory
    B x N*B instead of N*B x N*B). gather_with_grad: gradients flow through the gathered features
    of other ranks.

    What the gradient is, compared with one process computing the loss on the concatenated batch,
    once DDP has averaged gradients over the N ranks (proved in tests/test_loss.py, float64,
    N = 2 and 3):

        local_loss  gather_with_grad | encoder gradients          | logit_scale gradient
        False       True  (default)  | equal                      | equal
        True        True             | equal                      | equal
        False       False            | exactly 1/N of the truth   | equal
        True        False            | biased: not proportional   | biased

    Without gather_with_grad each rank drops the terms where other ranks' samples act as negatives
    for its own; with a global loss that is a uniform 1/N (just a smaller learning rate), but with
    a local loss it is a different, biased objective: a likely mechanism for the study's finding
    that the global loss trains more stably.
    """
    # RULE 4: the default is the global loss with gradient through the gather, the exact gradient.
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    batch = image_features.shape[0]
    all_image = image_features
    all_text = text_features
    offset = 0
    if world > 1:
        all_image = gather_features(image_features, gather_with_grad, local_loss)  # (N*B, D)
        all_text = gather_features(text_features, gather_with_grad, local_loss)
        offset = dist.get_rank() * batch
    if local_loss:
        logits_per_image = logit_scale * image_features @ all_text.T   # (B, N*B)
        logits_per_text = logit_scale * text_features @ all_image.T
        labels = torch.arange(batch, device=image_features.device) + offset
    else:
        logits_per_image = logit_scale * all_image @ all_text.T        # (N*B, N*B)
        logits_per_text = logits_per_image.T
        labels = torch.arange(all_image.shape[0], device=image_features.device)
    image_loss = F.cross_entropy(logits_per_image, labels)
    text_loss = F.cross_entropy(logits_per_text, labels)
    return (image_loss + text_loss) / 2


# ----------------------------------------------------------------------------- flags

def add_data_flags(add):
    """The training data: where it is, which rows train, how images are read and cropped."""
    add("--train-data", help="CSV/TSV of image paths and captions (default: the demo dataset)")
    add("--image-root",
        help="folder the CSV's image paths are relative to (default: the CSV's folder)")
    add("--csv-img-key", default="image_path", help="image path column (QUILT-1M's name)")
    add("--csv-caption-key", default="caption", help="caption column")
    add("--csv-separator", help="default: tab for .tsv, comma otherwise")
    add("--csv-split-key", default="split",
        help="column naming each row's split (QUILT-1M's); without it, every row is used")
    add("--train-split", default="train",
        help="train only on rows whose --csv-split-key is this value; 'all': every row")
    add("--workers", type=int, default=2,
        help="data-loader processes per rank (results do not depend on it)")
    add("--rrc-scale", type=float, default=0.8,
        help="RandomResizedCrop lower scale; RULE 5: 0.7-0.8")
    add("--rrc-ratio", type=float, nargs=2, default=list(data.RRC_RATIO), metavar=("LO", "HI"),
        help="RandomResizedCrop's range of crop aspects (width/height); see the fallback share "
             "printed at start: 16:9 frames need a wider range or a lower --rrc-scale")
    add("--bad-samples", choices=["error", "skip"], default="error",
        help="an unreadable image or empty caption stops the run (error) "
             "or is left out, decided before training (skip)")
    add("--check-data", action="store_true",
        help="read every image once before training and list the bad rows")
    add("--max-image-pixels", type=int, default=89_478_485,
        help="refuse larger images (decompression bombs)")
    add("--allow-absolute-paths", action="store_true",
        help="let CSV image paths leave --image-root")
    add("--jpeg-draft", action="store_true",
        help="decode large JPEGs at a reduced scale: a faster loader, other pixels")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add_data_flags(add)
    add("--model", default="tiny",
        help="tiny, ViT-B-32, ViT-B-16, or an OpenCLIP model-config JSON")
    add("--tokenizer", help="local HF tokenizer folder (default: train a BPE on the captions)")
    add("--pretrained",
        help="start from these weights: ours, OpenAI, OpenCLIP or a HF CLIPModel folder")
    add("--activation", choices=["quick_gelu", "gelu"],
        help="--pretrained's activation (default: its config's; none there: QuickGELU, noted)")
    add("--batch-size", type=int, default=64,
        help="per process; global batch = this x world size x accum-steps")
    add("--accum-steps", type=int, default=1,
        help="micro-batches per step, with the contrastive loss over all")
    add("--epochs", type=int, default=16, help="the demo default: a few minutes on 2 CPU cores")
    add("--max-steps", type=int, help="stop after this many optimizer steps")
    add("--lr", type=float, default=5e-4,
        help="OpenCLIP's ViT default; RULE 6: stay at or above 5e-5")
    add("--wd", type=float, default=0.2,
        help="AdamW weight decay, not applied to gains, biases, logit_scale")
    add("--warmup", type=int,
        help="linear warm-up steps (default: 10%% of the run, at most 10000)")
    add("--beta1", type=float, default=0.9)
    add("--beta2", type=float, default=0.98)
    add("--eps", type=float, default=1e-6)
    add("--grad-clip-norm", type=float)
    add("--precision", choices=["fp32", "bf16"],
        help="bf16 = autocast, weights stay fp32 "
             "(default: bf16 where the hardware has it natively, else fp32)")
    add("--seed", type=int, default=0)
    # RULE 4: the global loss with gradient through the gather by default: the exact gradient.
    add("--local-loss", action=argparse.BooleanOptionalAction, default=False)
    add("--gather-with-grad", action=argparse.BooleanOptionalAction, default=True)
    add("--deterministic", action=argparse.BooleanOptionalAction, default=True,
        help="deterministic kernels (RULE 7); --no-deterministic trades them for speed")
    add("--grad-checkpointing", action="store_true",
        help="recompute activations in backward to save memory")
    add("--output-dir", help="run folder (default: runs/<model>-seed<seed>-<time>)")
    add("--save-every", type=int, help="checkpoint every N steps (default: once per epoch)")
    add("--log-every", type=int, default=10)
    add("--resume", help="'auto' (newest valid checkpoint in --output-dir) or a checkpoint path")
    add("--compile", action="store_true",
        help="torch.compile the model (see docs/performance.md for what it gains)")
    add("--skip-nonfinite", type=int, default=0,
        help="skip up to N steps whose loss or gradient is not finite, instead of stopping")
    args = parser.parse_args(argv)
    check_flags(args)
    return args


def check_flags(args):
    """Refuse, in one line, a flag value that cannot work; warn about those the study advises
    against."""
    checks = [
        (args.batch_size >= 1, "--batch-size must be at least 1"),
        (args.accum_steps >= 1, "--accum-steps must be at least 1"),
        (args.epochs >= 1, "--epochs must be at least 1"),
        (args.max_steps is None or args.max_steps >= 1, "--max-steps must be at least 1"),
        (0 < args.rrc_scale <= 1, "--rrc-scale must lie in (0, 1]"),
        (0 < args.rrc_ratio[0] <= args.rrc_ratio[1], "--rrc-ratio LO HI needs 0 < LO <= HI"),
        (args.lr > 0, "--lr must be positive"),
        (args.workers >= 0, "--workers cannot be negative"),
        (args.resume != "auto" or args.output_dir,
         "--resume auto needs the --output-dir of the run"),
        (args.pretrained or not args.activation, "--activation applies to --pretrained weights; "
         "for --model, set quick_gelu in an OpenCLIP model-config JSON"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(f"{message}.")
    # RULE 6: a warning, not an error: fine-tuning may still want a smaller learning rate.
    if args.lr < 5e-5:
        print(f"warning: --lr {args.lr} is below 5e-5, which the study found degrades every "
              "dataset (RULE 6).")
    if args.local_loss and not args.gather_with_grad:
        print("warning: --local-loss without --gather-with-grad optimises a biased objective "
              "(see contrastive_loss).")


# ----------------------------------------------------------------------------- set-up

def seed_everything(seed, deterministic):
    # RULE 1: seed python, numpy and torch (CPU and every GPU) with the run's seed, on every rank,
    # so that the model is initialised identically everywhere.
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # RULE 7: deterministic kernels. cuBLAS reads its workspace setting when CUDA starts, so it is
    # set here, before any CUDA work; TF32 changes matmul results, so it is off.
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cuda.matmul.allow_tf32 = not deterministic
    torch.backends.cudnn.allow_tf32 = not deterministic


def cosine_lr(step, base_lr, warmup, total_steps):
    """Linear warm-up, then cosine decay to 0 (OpenCLIP's schedule)."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    decay_steps = max(1, total_steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / decay_steps)) * base_lr


def make_optimizer(model, args):
    # No weight decay on gains, biases, the class token and logit_scale (parameters of < 2 dims),
    # as OpenCLIP.
    params = [p for p in model.parameters() if p.requires_grad]
    decayed = [p for p in params if p.ndim >= 2]
    not_decayed = [p for p in params if p.ndim < 2]
    groups = [{"params": decayed, "weight_decay": args.wd},
              {"params": not_decayed, "weight_decay": 0.0}]
    betas = (args.beta1, args.beta2)
    # The fused kernel (one launch for all tensors) is much faster on CUDA and on CPU alike.
    return torch.optim.AdamW(groups, lr=args.lr, betas=betas, eps=args.eps, fused=True)


# ----------------------------------------------------------------------------- one order of sums

class TreeSum:
    """t0 + t1 + t2 + ... along one binary tree over the terms' index, whatever the hardware:
    ((t0 + t1) + (t2 + t3)) + ((t4 + t5) + (t6 + t7)).

    Floating-point addition is commutative (a + b = b + a, to the bit) but not associative:
    (a + b) + c and a + (b + c) can differ in the last bit. So RULE 3 makes the order of the
    gradients' sum a function of the global micro-batch index alone: one process adding
    micro-batches 0..3, and two processes adding 0..1 and 2..3 and then each other's sums, build
    the same tree, where a running sum ((t0 + t1) + t2) + t3 would not. As in counting in binary,
    two finished subtrees of one size are added at once: at most log2(n) + 1 sums are kept.
    """

    def __init__(self):
        self.subtrees = []  # (number of terms, their sum) of finished subtrees, left to right
        self.count = 0

    def add(self, term):
        """Take the next term; it becomes ours, for the sums are made in place."""
        size = 1
        while self.subtrees and self.subtrees[-1][0] == size:
            left = self.subtrees.pop()[1]
            term = left.add_(term)
            size *= 2
        self.subtrees.append((size, term))
        self.count += 1

    def total(self):
        """The sum. When the count is not a power of two, the subtrees left unpaired are added
        right to left."""
        total = self.subtrees.pop()[1]
        while self.subtrees:
            total = self.subtrees.pop()[1].add_(total)
        return total


class MicroBatchGradients:
    """Each parameter's gradients from the micro-batches of one step, added along TreeSum's
    tree."""

    def __init__(self, accum_steps):
        self.accum_steps = accum_steps
        self.trees = {}  # parameter -> TreeSum of its gradients so far this step

    def add(self, parameter, gradient):
        """Take one micro-batch's gradient (ours from now on); return the parameter's total
        once all accum_steps are in, else None."""
        tree = self.trees.setdefault(parameter, TreeSum())
        tree.add(gradient)
        if tree.count < self.accum_steps:
            return None
        return self.trees.pop(parameter).total()


def halves(part, rank, distance):
    """(the half of `part` that `rank` keeps in the round at `distance`, the partner's half)."""
    middle = (part.start + part.stop) // 2
    lower = slice(part.start, middle)
    upper = slice(middle, part.stop)
    if rank & distance:  # the higher rank of the pair
        return upper, lower
    return lower, upper


def exchange(send, receive, partner):
    """Send `send` to rank `partner` while receiving `receive` from it."""
    # One group of two operations: on NCCL, a lone send posted first by both ranks of a pair
    # waits for a receive that neither has posted yet (gloo buffers, and would not show it).
    operations = [dist.P2POp(dist.isend, send, partner),
                  dist.P2POp(dist.irecv, receive, partner)]
    for request in dist.batch_isend_irecv(operations):
        request.wait()


def tree_all_reduce(buffer):
    """Sum a flat `buffer` over a power-of-two number of ranks, in place, along a binary tree
    over the rank index: ((r0 + r1) + (r2 + r3)) + ...

    Recursive halving, then doubling. In round d = 1, 2, 4, ... each rank pairs with rank ^ d,
    keeps half of its part and adds the partner's sums for that half: after log2(N) rounds it
    holds 1/N of the buffer summed along the tree. The rounds backwards hand the parts around.
    Each rank sends about twice the buffer, as in a ring all-reduce.
    """
    rank = dist.get_rank()
    world = dist.get_world_size()
    part = slice(0, buffer.numel())  # what this rank sums: all of it, then halves of halves
    parts = []
    distance = 1
    while distance < world:
        keep, give = halves(part, rank, distance)
        received = torch.empty_like(buffer[keep])
        exchange(buffer[give], received, rank ^ distance)
        # Mine + theirs is theirs + mine to the bit: the two ranks of a pair add the same two
        # subtrees, whichever of them holds which.
        buffer[keep] += received
        parts.append(part)
        part = keep
        distance *= 2
    while parts:
        distance //= 2
        mine, theirs = halves(parts.pop(), rank, distance)
        exchange(buffer[mine], buffer[theirs], rank ^ distance)


def finished(tensor):
    """A future that already holds `tensor`: a DDP hook that has done its work returns one."""
    future = torch.futures.Future()
    future.set_result(tensor)
    return future


def tree_all_reduce_hook(gradients, bucket):
    """DDP communication hook: the mean over ranks of a bucket of gradients, added along one
    tree over the global micro-batch index, not in the order of DDP's all-reduce (a ring's).

    `gradients`: this rank's MicroBatchGradients. DDP calls the hook after each backward (no
    no_sync in train_step): it keeps each micro-batch's gradients and zeroes the bucket (so the
    next backward writes 0 + g = g); after the last, it adds up this rank's micro-batches
    r*K .. r*K+K-1 (data.GlobalBatchSampler), one subtree of the tree, and communicates. It
    waits for its messages, where DDP's all-reduce overlaps the rest of backward: on 2 gloo
    processes a step costs 1-5% more (bench.py --ddp 2).
    """
    buffer = bucket.buffer()  # the bucket's gradients, flat
    if gradients.accum_steps > 1:
        views = bucket.gradients()  # each parameter's gradient: a view into the buffer
        totals = [gradients.add(p, g.clone()) for p, g in zip(bucket.parameters(), views)]
        if totals[0] is None:
            return finished(buffer.zero_())
        for view, total in zip(views, totals):
            view.copy_(total)
    world = dist.get_world_size()
    if world & (world - 1):  # not a power of two: no tree to match, float rounding
        dist.all_reduce(buffer)
    else:
        tree_all_reduce(buffer)
    return finished(buffer.div_(world))


def world_size_guarantee(args, world):
    """What another split of this global batch into processes x --accum-steps at the same
    --batch-size gives: {"level": "bitwise", "float rounding" or "none", "why": ...}."""
    # RULE 3: said at start and kept in the manifest, so that nobody expects more than holds.
    K = args.accum_steps
    rounding = "float rounding"
    if not args.gather_with_grad:
        return {"level": "none", "why": "--no-gather-with-grad: the encoders' gradient "
                "depends on the number of processes (see contrastive_loss)"}
    if args.local_loss:
        return {"level": rounding, "why": "--local-loss: each rank sums its own rows' loss"}
    if not args.deterministic or args.compile:
        return {"level": rounding, "why": "--no-deterministic or --compile kernels"}
    if world & (world - 1) or K & (K - 1):
        return {"level": rounding, "why": f"{world} process(es) x --accum-steps {K}: "
                "not both powers of two, so sums and divisions round differently"}
    return {"level": "bitwise", "why": "any power-of-two number of processes x --accum-steps "
            "at this --batch-size, on the same hardware, libraries and threads per process"}


# ----------------------------------------------------------------------------- one step

def train_step(model, micro_batches, args, autocast):
    """Forward and backward of one global batch; returns the loss (detached).

    With --accum-steps K the loss still spans all K micro-batches (all negatives), as OpenCLIP's
    --accum-freq: first embed every micro-batch without gradient, then recompute each one with
    gradient against the cached rest and backpropagate. The K backward passes add up to the exact
    gradient of the one big batch; logit_scale takes part in all K, so its gradient is scaled by
    1/K. The K gradients are added along TreeSum's tree: here on one process, under DDP in
    tree_all_reduce_hook, together with the other ranks'.
    """
    K = len(micro_batches)
    # RULE 3: one global batch for the loss, however many micro-batches it is computed in.
    cached = [(None, None)]  # with one micro-batch there is no rest to cache
    if K > 1:
        with torch.no_grad(), autocast:
            cached = [model(images, tokens)[:2] for images, tokens in micro_batches]
    gradients = None  # under DDP (which has no_sync, compiled or not), the hook adds them up
    if K > 1 and not hasattr(model, "no_sync"):
        gradients = MicroBatchGradients(K)
    for k, (images, tokens) in enumerate(micro_batches):
        with autocast:
            image_features, text_features, logit_scale = model(images, tokens)
            # The global batch: this micro-batch with gradient, the others as cached.
            image_parts = [image for image, _ in cached]
            text_parts = [text for _, text in cached]
            image_parts[k] = image_features
            text_parts[k] = text_features
            all_image = torch.cat(image_parts)
            all_text = torch.cat(text_parts)
            # The same value, with its gradient multiplied by 1/K (by exactly 1 when K = 1).
            logit_scale = logit_scale.detach() + (logit_scale - logit_scale.detach()) * (1 / K)
            loss = contrastive_loss(all_image, all_text, logit_scale,
                                    local_loss=args.local_loss,
                                    gather_with_grad=args.gather_with_grad)
        loss.backward()  # outside autocast, as PyTorch advises
        if gradients is not None:
            # RULE 3: the tree, not a running sum. The gradient is None again until the last
            # micro-batch's total, so that each backward writes its own.
            for p in model.parameters():
                if p.grad is not None:
                    p.grad = gradients.add(p, p.grad)
    return loss.detach()


def gradient_norm(model):
    """The L2 norm of all gradients together, left on the device (no synchronisation)."""
    return torch.nn.utils.get_total_norm([p.grad for p in model.parameters()
                                          if p.grad is not None])


def optimizer_step(model, optimizer, args, norm=None):
    """After train_step: clip (if asked), step, clear the gradients, clamp the temperature.
    `norm`, the gradients' norm if the caller has it already, is not computed twice."""
    if args.grad_clip_norm:
        if norm is None:
            norm = gradient_norm(model)
        torch.nn.utils.clip_grads_with_norm_(model.parameters(), args.grad_clip_norm, norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.clamp_logit_scale()


def next_micro_batches(batches, accum_steps, device):
    """The next global batch's micro-batches on `device`; a bad sample stops the run. Images
    cross from the loader workers as uint8 and are normalised here, on the device."""
    micro_batches = []
    for _ in range(accum_steps):
        batch = next(batches)
        if isinstance(batch, data.BadSample):
            raise UsageError(batch.message)
        images, tokens = batch
        images = data.normalize_on_device(images, device)  # (B, 3, H, W) uint8 -> float32
        tokens = tokens.to(device, non_blocking=True)
        micro_batches.append([images, tokens])
    return micro_batches


# ----------------------------------------------------------------------------- the phases of a run

def image_root(args):
    return args.image_root or os.path.dirname(os.path.abspath(args.train_data))


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


class TrainData(NamedTuple):
    """The CSV's training rows (its --train-split) and what is known of them before training."""
    rows: data.Rows      # (image path, caption) of the rows the split keeps
    samples: np.ndarray   # indices into rows of those to train on: all, or all but the bad ones
    split_filter: dict    # the column, the value, the rows in the CSV and the rows kept
    sha256: str           # of the CSV file: the data's fingerprint
    crop_fallback: float  # the share of crops that are RandomResizedCrop's fixed centre crop


def prepare_data(args, run_dir, proc, clock):
    """The training rows, decided before training and identical on every rank. Without
    --train-data, rank 0 generates the demo dataset while the others wait."""
    if args.train_data is None:
        if proc.is_main:
            demo_data.ensure_demo_data()
        plumbing.barrier()
        args.train_data = demo_data.ensure_demo_data()
    rows, sizes, split_filter = data.read_csv_table(
        args.train_data, args.csv_img_key, args.csv_caption_key, args.csv_separator,
        args.csv_split_key, args.train_split)
    clock.lap("read and filter")  # one pass: the split is filtered as the rows are read
    data.check_paths(rows.paths, image_root(args), args.train_data, args.allow_absolute_paths,
                     rows.numbers)
    samples = usable_samples(args, rows, run_dir, proc)
    crop_fallback = None
    if proc.is_main:
        report_split(args, split_filter)
        crop_fallback = report_crop_fallback(args, rows, sizes)
    clock.lap("checks")
    sha256 = plumbing.file_sha256(args.train_data)
    clock.lap("fingerprint")
    return TrainData(rows, samples, split_filter, sha256, crop_fallback)


def usable_samples(args, rows, run_dir, proc):
    """Indices of the rows to train on: all of them, or, with --bad-samples skip, all but those
    whose image or caption cannot be used (each rank reads a share; --check-data only lists)."""
    if not (args.check_data or args.bad_samples == "skip"):
        return np.arange(len(rows))
    # Each rank reads its share of the images (with its workers); everybody gets the whole list.
    share = range(proc.rank, len(rows), proc.world)
    found = data.find_bad_samples(rows, share, image_root(args), args.workers,
                                  args.max_image_pixels)
    bad = {}
    for part in plumbing.gather_objects(found):
        bad.update(part)
    if proc.is_main:
        listing = {f"data row {data.data_row(rows, i)}": bad[i] for i in sorted(bad)}
        plumbing.write_json(os.path.join(run_dir, "bad_samples.json"), listing)
    if bad and args.bad_samples == "error":
        first = min(bad)
        raise UsageError(f"{args.train_data}: {len(bad)} bad rows; data row "
                         f"{data.data_row(rows, first)} "
                         f"({rows[first][0]}): {bad[first]}. All are in {run_dir}/"
                         "bad_samples.json: fix them or pass --bad-samples skip.")
    return np.delete(np.arange(len(rows)), sorted(bad))


def report_split(args, split_filter):
    """Say which rows train: rows a dataset holds out are never trained on silently."""
    kept = split_filter["rows_kept"]
    total = split_filter["rows_in_csv"]
    column = split_filter["column"]
    if not split_filter["column_present"]:
        print(f"train rows: all {total:,} ({args.train_data} has no column '{column}')")
    elif split_filter["value"] == "all":
        print(f"train rows: all {total:,}, every value of '{column}' (--train-split all)")
    else:
        print(f"train rows: {kept:,} of {total:,} ({column} == {split_filter['value']!r}); "
              f"{total - kept:,} held out")


def report_crop_fallback(args, rows, sizes):
    """The share of crops that are RandomResizedCrop's fixed centre crop on these images, with
    a warning above 25%; None when no image size could be read."""
    # RULE 5: on 16:9 video frames a crop of >= 0.8 of the area never has an aspect <= 4/3, so
    # every try fails and each epoch sees the same centre crop: say so before training.
    measured = data.image_sizes(rows, image_root(args), sizes)
    share = data.crop_fallback_share(measured, args.rrc_scale, args.rrc_ratio)
    if share is None:
        return None
    low, high = args.rrc_ratio
    print(f"RandomResizedCrop: scale ({args.rrc_scale}, 1), ratio ({low:.3g}, {high:.3g}): "
          f"{share:.0%} of crops on these images fall back to a fixed centre crop")
    if share > 0.25:
        wide = data.crop_fallback_share(measured, args.rrc_scale, (9 / 16, 16 / 9))
        lower = data.crop_fallback_share(measured, 0.6, args.rrc_ratio)
        print(f"warning: {share:.0%} of training crops are the same centre crop in every epoch "
              f"(wide frames, such as 16:9 video). --rrc-ratio 0.5625 1.778 gives {wide:.0%}, "
              f"--rrc-scale 0.6 gives {lower:.0%} (see RULES.md, rule 5).")
    return share


def make_tokenizer(args, rows, vocab_size, run_dir, proc):
    """RUN/tokenizer, where evaluation, export and fine-tuning look for it: a copy of --tokenizer
    or a BPE trained on the captions, written by rank 0 and loaded by every rank."""
    tokenizer_dir = os.path.join(run_dir, "tokenizer")
    if proc.is_main and not os.path.isdir(tokenizer_dir):
        if args.tokenizer:
            save = data.load_tokenizer(args.tokenizer).save_pretrained
            plumbing.atomic_write(tokenizer_dir, save)
        else:
            data.train_tokenizer(rows.captions, tokenizer_dir, vocab_size)
    plumbing.barrier()
    return data.load_tokenizer(tokenizer_dir)


def build_model(args, rows, run_dir, proc, clock):
    """The tokenizer, the model on this rank's device, and its optimizer."""
    # Weights bring their own sizes (--model names a preset or config otherwise) and need the
    # tokenizer they were trained with: one of our run checkpoints finds its run's; published
    # weights name theirs.
    if args.pretrained and not args.tokenizer:
        args.tokenizer = run_tokenizer_folder(args.pretrained)
        if not args.tokenizer:
            raise UsageError(f"--pretrained {args.pretrained} is not one of our run checkpoints: "
                             "pass --tokenizer DIR, the tokenizer folder published with these "
                             "weights (vocab.json + merges.txt, or tokenizer.json; "
                             "a Hub folder may hold it beside them).")
    model = None
    if args.pretrained:
        notes = sys.stdout if proc.is_main else io.StringIO()  # rank 0 alone prints
        with contextlib.redirect_stdout(notes):
            model = CLIP.from_pretrained(args.pretrained, args.activation).train()
        cfg = model.config
    else:
        cfg = model_config(args.model)
    tokenizer = make_tokenizer(args, rows, cfg.vocab_size, run_dir, proc)
    clock.lap("tokenizer")
    if not args.tokenizer and not model:
        cfg.vocab_size = len(tokenizer)  # our BPE may stop short of the requested size
    elif len(tokenizer) > cfg.vocab_size:
        weights = f"--pretrained {args.pretrained}" if args.pretrained else f"--model {args.model}"
        raise UsageError(f"--tokenizer {args.tokenizer} has {len(tokenizer)} tokens; {weights} "
                         f"embeds only {cfg.vocab_size}.")
    # RULE 1: the initial weights depend on the seed alone, whatever ran before.
    torch.manual_seed(args.seed)
    model = model or CLIP(cfg)
    model = model.to(proc.device)
    model.set_grad_checkpointing(args.grad_checkpointing)
    optimizer = make_optimizer(model, args)
    clock.lap("model")
    return tokenizer, model, optimizer


class Schedule(NamedTuple):
    """The run's length: a function of the flags, the number of processes and the dataset size."""
    global_batch: int
    steps_per_epoch: int
    total_steps: int
    warmup: int
    save_every: int


def make_schedule(args, usable, world):
    global_batch = args.batch_size * world * args.accum_steps
    steps_per_epoch = usable // global_batch
    if steps_per_epoch == 0:
        raise UsageError(f"{args.train_data} has {usable} usable rows, fewer than one global "
                         f"batch of {global_batch} (--batch-size {args.batch_size} x {world} "
                         f"processes x --accum-steps {args.accum_steps}). Lower --batch-size.")
    total_steps = min(args.epochs * steps_per_epoch, args.max_steps or math.inf)
    warmup = args.warmup
    if warmup is None:
        warmup = min(10_000, total_steps // 10)
    save_every = args.save_every or steps_per_epoch
    return Schedule(global_batch, steps_per_epoch, total_steps, warmup, save_every)


def run_identity(args, schedule, train_data):
    """What fixes the order of the samples and the learning-rate schedule. A resumed run must
    match its checkpoint in all of it; only the split of the global batch into processes x
    --batch-size x --accum-steps may change (RULE 3 keeps the batches the same)."""
    return {"global batch": schedule.global_batch, "--seed": args.seed,
            "--epochs": args.epochs, "--max-steps": args.max_steps,
            "--warmup": schedule.warmup, "--lr": args.lr, "--model": args.model,
            "--activation": args.activation,
            "--train-data sha256": train_data.sha256,
            "--csv-split-key": args.csv_split_key, "--train-split": args.train_split,
            "training rows": len(train_data.samples)}


def check_same_run(checkpoint, identity, path):
    """Refuse, in one line, to resume a checkpoint as if it were another run."""
    # RULE 8: the step in a checkpoint means something only under the run that wrote it: another
    # global batch, data or schedule would move the epochs, the order and the learning rate.
    saved = checkpoint.get("run_identity", identity)  # checkpoints of older versions lack it
    differences = [f"{key} {saved.get(key)!r} there, {value!r} here"
                   for key, value in identity.items() if saved.get(key) != value]
    if differences:
        raise UsageError(f"--resume {path}: not the same run: {'; '.join(differences)}. Resume "
                         "with the checkpoint's values, or start a new --output-dir.")


def find_resume_checkpoint(run_dir):
    """The newest step checkpoint that loads, skipping any damaged one with a warning."""
    checkpoints = plumbing.step_checkpoints(os.path.join(run_dir, "checkpoints"))
    for _, path in sorted(checkpoints, reverse=True):
        try:
            return path, read_weights_file(path)
        except UsageError as e:
            print(f"warning: skipping {e}")
    return None, None


def resume_or_start(args, run_dir, model, optimizer, identity, proc):
    """(first step, steps skipped so far, resumed?): from --resume's checkpoint, else from 0."""
    path = args.resume
    checkpoint = None
    if args.resume == "auto":
        if proc.is_main:
            path, checkpoint = find_resume_checkpoint(run_dir)
        # RULE 8: rank 0 chooses and every rank loads that one, so ranks with node-local disks or
        # a stale network-filesystem cache never start from different checkpoints.
        path = plumbing.gather_objects(path)[0]
    if path and checkpoint is None:
        checkpoint = read_weights_file(path)
    if not checkpoint:
        return 0, [], False
    check_same_run(checkpoint, identity, path)
    start_step = checkpoint["step"]
    skipped = checkpoint["skipped_steps"]
    # RULE 8: resume restores everything that decides the future: weights, optimizer moments,
    # the step (which fixes the schedule and the sampler's position) and the random states.
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    plumbing.set_rng_states(checkpoint["rng"])
    if proc.is_main:
        print(f"resuming from {path} at step {start_step}")
    return start_step, skipped, True


def distribute(model, args, world):
    """The model as the loop calls it: in DDP on several processes, compiled if asked."""
    if world > 1:
        # static_graph lets DDP plan its all-reduces once; --accum-steps's no-grad caching pass
        # changes the graph.
        model = DDP(model, gradient_as_bucket_view=True, static_graph=args.accum_steps == 1)
        # RULE 3: the gradients' sum in one order for any split of the global batch.
        model.register_comm_hook(MicroBatchGradients(args.accum_steps), tree_all_reduce_hook)
    if args.compile:
        model = torch.compile(model)  # after DDP, as PyTorch advises
    return model


def make_loader(args, train_data, tokenizer, cfg, schedule, start_step, proc):
    """This rank's micro-batches of every step from `start_step` on."""
    dataset = data.CsvDataset(train_data.rows, image_root(args), tokenizer, cfg.image_size,
                              cfg.context_length, args.rrc_scale, args.seed,
                              args.max_image_pixels, args.jpeg_draft, args.rrc_ratio)
    sampler = data.GlobalBatchSampler(train_data.samples, args.batch_size, proc.world, proc.rank,
                                      args.accum_steps, args.seed, schedule.total_steps,
                                      start_step)
    pin_memory = proc.device.type == "cuda"
    return data.make_train_loader(dataset, sampler, args.workers, args.seed, pin_memory)


def write_manifest(args, run_dir, proc, schedule, cfg, tokenizer, train_data, resumed,
                   startup_seconds):
    """manifest.json; returned, for `finish` to complete. A resumed run keeps its start time."""
    # RULE 9: the manifest records everything that could change a result: every resolved flag,
    # the data, the tokenizer, the determinism settings, the libraries and the machine.
    path = os.path.join(run_dir, "manifest.json")
    manifest = {}
    if resumed and os.path.exists(path):
        manifest = json.load(open(path))
    tokenizer_path = args.tokenizer or os.path.join(run_dir, "tokenizer")
    manifest.update({
        "args": vars(args), "command": " ".join(sys.argv), "model_config": vars(cfg),
        "seed": args.seed, "world_size": proc.world,
        "global_batch_size": schedule.global_batch, "steps_per_epoch": schedule.steps_per_epoch,
        "total_steps": schedule.total_steps, "warmup_steps": schedule.warmup,
        "train_data": {"path": os.path.abspath(args.train_data),
                       "rows": len(train_data.rows),
                       "bad_rows": len(train_data.rows) - len(train_data.samples),
                       "split_filter": train_data.split_filter,
                       "crop_fallback_share": train_data.crop_fallback,
                       "sha256": train_data.sha256,
                       "resized": data.resize_record(args.train_data)},
        "tokenizer": {"path": os.path.abspath(tokenizer_path), "vocab_size": len(tokenizer),
                      "sha256": data.tokenizer_fingerprint(tokenizer)},
        "determinism": {"deterministic": args.deterministic,
                        "tf32": torch.backends.cuda.matmul.allow_tf32,
                        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
                        "cudnn_benchmark": torch.backends.cudnn.benchmark},
        "world_size_guarantee": world_size_guarantee(args, proc.world),
        **plumbing.environment(proc.device),
        "startup_seconds": startup_seconds,
        "started": manifest.get("started", datetime.datetime.now().isoformat()),
    })
    plumbing.write_json(path, manifest)
    return manifest


# ----------------------------------------------------------------------------- the loop

def save_step(args, run_dir, model, optimizer, done, epoch, skipped, identity, is_main):
    """Rank 0 saves the state after step `done`; the others wait for it."""
    if is_main:
        save_checkpoint(run_dir, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": done,
            "epoch": epoch, "config": vars(model.config), "args": vars(args),
            "rng": plumbing.rng_states(), "skipped_steps": skipped, "run_identity": identity})
    plumbing.barrier()  # nobody runs ahead of a checkpoint that may be needed to resume


def train(args, model, ddp_model, optimizer, loader, schedule, start_step, skipped, identity,
          run_dir, proc):
    """An optimizer step per global batch; a log line every --log-every steps and a checkpoint
    every schedule.save_every, both at the last step too."""
    total = schedule.total_steps
    autocast = torch.autocast(proc.device.type, dtype=torch.bfloat16,
                              enabled=args.precision == "bf16")
    nonfinite = plumbing.NonFiniteLoss(args.skip_nonfinite, total, skipped, run_dir, proc.device)
    batches = iter(loader)
    log_path = os.path.join(run_dir, "log.jsonl")
    with plumbing.Log(log_path, total, start_step, proc.is_main) as log:
        for step in range(start_step, total):
            lr = cosine_lr(step, args.lr, schedule.warmup, total)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro_batches = next_micro_batches(batches, args.accum_steps, proc.device)
            loss = train_step(ddp_model, micro_batches, args, autocast)
            done = step + 1
            # A finite loss can still have a gradient that overflowed in backward: judge both.
            norm = gradient_norm(model)
            if nonfinite.skip(loss, norm, done):
                optimizer.zero_grad(set_to_none=True)
            else:
                optimizer_step(model, optimizer, args, norm)
            log.progress.update()
            log_now = done % args.log_every == 0 or done == total
            save_now = done % schedule.save_every == 0 or done == total
            if log_now or save_now:  # the only synchronisations in the loop
                nonfinite.check()  # never log or save a model that is not finite
            if log_now:
                loss = plumbing.mean_over_ranks(loss)  # every rank takes part
                record = {"step": done, "epoch": step // schedule.steps_per_epoch,
                          "loss": loss.item(), "lr": lr,
                          "logit_scale": model.logit_scale.exp().item()}
                log.write(record, args.log_every * schedule.global_batch)
            if save_now:
                epoch = done // schedule.steps_per_epoch
                save_step(args, run_dir, model, optimizer, done, epoch, skipped, identity,
                          proc.is_main)


def finish(args, model, tokenizer, manifest, skipped, started, run_dir, device):
    """Rank 0's: fingerprint the final weights, close the manifest, and score the demo."""
    sha = plumbing.weights_sha256(model.state_dict())
    print(f"final weights sha256 {sha}")
    manifest.update({"final_weights_sha256": sha, "finished": datetime.datetime.now().isoformat(),
                     "wall_time_s": round(time.time() - started, 1),
                     "skipped_nonfinite_steps": skipped})
    demo_csv = os.path.join(demo_data.DEMO_DIR, "train.csv")
    if os.path.abspath(args.train_data) == os.path.abspath(demo_csv):
        manifest["demo_zero_shot"] = evaluate.demo_zero_shot(model, tokenizer, device)
    plumbing.write_json(os.path.join(run_dir, "manifest.json"), manifest)


def main(argv=None):
    args = parse_args(argv)
    started = time.time()
    proc = plumbing.setup_distributed()
    seed_everything(args.seed, args.deterministic)
    plumbing.keep_freed_memory(proc.device)
    args.precision = args.precision or default_precision(proc.device)

    run_dir = make_run_dir(args)
    if proc.is_main:
        plumbing.remove_leftovers(run_dir)  # of writes a killed run left midway
    clock = Stopwatch()
    train_data = prepare_data(args, run_dir, proc, clock)
    tokenizer, model, optimizer = build_model(args, train_data.rows, run_dir, proc, clock)
    schedule = make_schedule(args, len(train_data.samples), proc.world)
    identity = run_identity(args, schedule, train_data)
    start_step, skipped, resumed = resume_or_start(args, run_dir, model, optimizer, identity,
                                                   proc)
    ddp_model = distribute(model, args, proc.world)
    loader = make_loader(args, train_data, tokenizer, model.config, schedule, start_step, proc)
    clock.lap("resume and loader")
    if proc.is_main:
        phases = ", ".join(f"{phase} {seconds:.1f} s" for phase, seconds in clock.seconds.items())
        print(f"start-up: {phases}")
        manifest = write_manifest(args, run_dir, proc, schedule, model.config, tokenizer,
                                  train_data, resumed, clock.seconds)
        # Lines a killed run wrote after its last checkpoint are redone.
        plumbing.keep_log_until(os.path.join(run_dir, "log.jsonl"), start_step)
        print(f"run folder {run_dir}: {len(train_data.samples)} pairs, {proc.world} process(es) x "
              f"{args.batch_size} x {args.accum_steps} = global batch {schedule.global_batch}, "
              f"{schedule.total_steps} steps")
        guarantee = world_size_guarantee(args, proc.world)
        print(f"another split of this global batch (RULE 3): {guarantee['level']}, "
              f"{guarantee['why']}")

    train(args, model, ddp_model, optimizer, loader, schedule, start_step, skipped, identity,
          run_dir, proc)
    if proc.is_main:
        finish(args, model, tokenizer, manifest, skipped, started, run_dir, proc.device)
    if dist.is_initialized():
        dist.destroy_process_group()
    return model


if __name__ == "__main__":
    plumbing.run_main(main)
