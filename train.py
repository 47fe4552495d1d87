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
import contextlib
import io
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
import evaluate
from model import CLIP, model_config
from support import demo_data, distributed, run_folder
from support.csv_table import Rows, check_paths
from support.data_checks import report_crop_fallback, report_split, usable_samples
from support.errors import UsageError, run_main
from support.files import atomic_write, file_sha256, weights_sha256
from support.machine import default_precision, keep_freed_memory
from support.manifest import finish_invocation, write_manifest
from support.measure import Stopwatch
from support.pretrained import run_tokenizer_folder
from support.train_flags import continue_recorded_run, given_flags, image_root, parse_args
from support.training_log import Log, NonFiniteLoss
from support.tree_all_reduce import (refuse_python_reducer, tree_all_reduce_hook,
                                     uses_tree_hook, world_size_guarantee)


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

    def keeps_next(self):
        """Whether the next term is kept as a subtree of its own, rather than added at once."""
        return not self.subtrees or self.subtrees[-1][0] != 1

    def add(self, term):
        """Take the next term. The sums are made in place, into the left one: a kept term
        (keeps_next) becomes ours; one added at once, or the last, is only read."""
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

    def keeps_next(self, parameter):
        """Whether the parameter's next gradient is kept as it is, so must be a copy: neither
        added to a subtree at once nor the step's last."""
        tree = self.trees.get(parameter, TreeSum())
        return tree.count + 1 < self.accum_steps and tree.keeps_next()


# ----------------------------------------------------------------------------- one step

def micro_batch_loss(model, images, tokens, cached, k, autocast, args):
    """The loss of the global batch with micro-batch k recomputed with gradient, the others as
    `cached`."""
    K = len(cached)
    with autocast:
        image_features, text_features, logit_scale = model(images, tokens)
        image_parts = [image for image, _ in cached]
        text_parts = [text for _, text in cached]
        image_parts[k] = image_features
        text_parts[k] = text_features
        all_image = torch.cat(image_parts)
        all_text = torch.cat(text_parts)
        # The same value, with its gradient multiplied by 1/K (by exactly 1 when K = 1).
        logit_scale = logit_scale.detach() + (logit_scale - logit_scale.detach()) * (1 / K)
        return contrastive_loss(all_image, all_text, logit_scale, local_loss=args.local_loss,
                                gather_with_grad=args.gather_with_grad)


def train_step(model, micro_batches, args, autocast):
    """Forward and backward of one global batch; returns the loss (detached).

    With --accum-steps K the loss still spans all K micro-batches (all negatives), as OpenCLIP's
    --accum-freq: first embed every micro-batch without gradient, then recompute each one with
    gradient against the cached rest and backpropagate. The K backward passes add up to the exact
    gradient of the one big batch; logit_scale takes part in all K, so its gradient is scaled by
    1/K. The K gradients are added along TreeSum's tree: here on one process, under DDP in
    tree_all_reduce_hook, together with the other ranks'; where no bits are promised, DDP adds
    them as they come and all-reduces once, after the last.
    """
    K = len(micro_batches)
    # RULE 3: one global batch for the loss, however many micro-batches it is computed in.
    cached = [(None, None)]  # with one micro-batch there is no rest to cache
    if K > 1:
        with torch.no_grad(), autocast:
            cached = [model(images, tokens)[:2] for images, tokens in micro_batches]
    gradients = None  # under DDP (which has no_sync, compiled or not), DDP adds them up
    plain_ddp = False  # DDP without the tree hook: no_sync for all micro-batches but the last
    if hasattr(model, "no_sync"):
        plain_ddp = not uses_tree_hook(args, dist.get_world_size())
    elif K > 1:
        gradients = MicroBatchGradients(K)
    for k, (images, tokens) in enumerate(micro_batches):
        sync = contextlib.nullcontext()
        if plain_ddp and k < K - 1:
            sync = model.no_sync()
        with sync:  # forward and backward both: DDP prepares its all-reduce in forward
            loss = micro_batch_loss(model, images, tokens, cached, k, autocast, args)
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


# ----------------------------------------------------------------------------- the phases of a run


class TrainData(NamedTuple):
    """The CSV's training rows (its --train-split) and what is known of them before training."""
    rows: Rows           # (image path, caption) of the rows the split keeps
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
        distributed.barrier()
        args.train_data = demo_data.ensure_demo_data()
    rows, sizes, split_filter = data.read_csv_table(
        args.train_data, args.csv_img_key, args.csv_caption_key, args.csv_separator,
        args.csv_split_key, args.train_split)
    clock.lap("read and filter")  # one pass: the split is filtered as the rows are read
    check_paths(rows.paths, image_root(args), args.train_data, args.allow_absolute_paths,
                rows.numbers)
    samples = usable_samples(args, rows, run_dir, proc)
    crop_fallback = None
    if proc.is_main:
        report_split(args, split_filter)
        crop_fallback = report_crop_fallback(args, rows, sizes)
    clock.lap("checks")
    sha256 = file_sha256(args.train_data)
    clock.lap("fingerprint")
    return TrainData(rows, samples, split_filter, sha256, crop_fallback)


def make_tokenizer(args, rows, vocab_size, run_dir, proc):
    """RUN/tokenizer, where evaluation, export and fine-tuning look for it: a copy of --tokenizer
    or a BPE trained on the captions, written by rank 0 and loaded by every rank."""
    tokenizer_dir = os.path.join(run_dir, "tokenizer")
    if proc.is_main and not os.path.isdir(tokenizer_dir):
        if args.tokenizer:
            save = data.load_tokenizer(args.tokenizer).save_pretrained
            atomic_write(tokenizer_dir, save)
        else:
            data.train_tokenizer(rows.captions, tokenizer_dir, vocab_size)
    distributed.barrier()
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


def last_step(args, schedule, start_step):
    """The step this invocation ends after: the run's last, or --stop-at-step's if sooner."""
    if start_step == schedule.total_steps:  # killed before finish: it trains none, and finishes
        return start_step
    last = min(schedule.total_steps, args.stop_at_step or math.inf)
    if last <= start_step:
        raise UsageError(f"--stop-at-step {args.stop_at_step}: this run is at step {start_step} "
                         "already. Stop at a later step, or leave the flag out.")
    return last


def resume_or_start(resume_point, model, optimizer, identity, proc):
    """(first step, steps skipped so far): from the checkpoint of find_resume_point, else 0."""
    if not resume_point:
        return 0, []
    path, checkpoint = resume_point
    run_folder.check_same_run(checkpoint, identity, path)
    start_step = checkpoint["step"]
    skipped = checkpoint["skipped_steps"]
    # RULE 8: resume restores everything that decides the future: weights, optimizer moments,
    # the step (which fixes the schedule and the sampler's position) and the random states.
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    run_folder.set_rng_states(checkpoint["rng"], proc)
    checkpoint.clear()  # its tensors are copied: free them (~1.8 GB for ViT-B-32 with AdamW)
    if proc.is_main:
        print(f"resuming from {path} at step {start_step}")
    return start_step, skipped


def distribute(model, args, world):
    """The model as the loop calls it: in DDP on several processes, with the tree hook where
    its bits are promised, compiled if asked."""
    if world > 1:
        # static_graph lets DDP plan its all-reduces once; --accum-steps's no-grad caching pass
        # changes the graph.
        tree = uses_tree_hook(args, world)
        if tree:
            refuse_python_reducer()
        model = DDP(model, gradient_as_bucket_view=True, static_graph=args.accum_steps == 1)
        if tree:
            # RULE 3: the gradients' sum in one order for any split of the global batch.
            model.register_comm_hook(MicroBatchGradients(args.accum_steps),
                                     tree_all_reduce_hook)
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


# ----------------------------------------------------------------------------- the loop

def save_step(args, run_dir, model, optimizer, done, epoch, skipped, identity, is_main):
    """Rank 0 saves the state after step `done`, with every rank's random states; the others
    wait for it."""
    rng = run_folder.rng_states_of_every_rank()  # a collective: every rank takes part
    if is_main:
        run_folder.save_checkpoint(run_dir, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": done,
            "epoch": epoch, "config": vars(model.config), "args": vars(args),
            "rng": rng, "skipped_steps": skipped, "run_identity": identity})
    distributed.barrier()  # nobody runs ahead of a checkpoint that may be needed to resume


def train(args, model, ddp_model, optimizer, loader, schedule, start_step, last, skipped,
          identity, run_dir, proc, zero_shot=None):
    """An optimizer step per global batch up to step `last`; a log line every --log-every steps
    and a checkpoint every schedule.save_every, both at the run's last step too, and a checkpoint
    at `last` (where --stop-at-step ends this invocation); zero-shot accuracies every
    --zeroshot-every steps and at the run's last, where `zero_shot` scores them (rank 0)."""
    total = schedule.total_steps
    autocast = torch.autocast(proc.device.type, dtype=torch.bfloat16,
                              enabled=args.precision == "bf16")
    nonfinite = NonFiniteLoss(args.skip_nonfinite, total, skipped, run_dir, proc.device)
    batches = iter(loader)
    log_path = os.path.join(run_dir, "log.jsonl")
    with Log(log_path, total, start_step, proc.is_main) as log:
        for step in range(start_step, last):
            lr = cosine_lr(step, args.lr, schedule.warmup, total)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro_batches = data.next_micro_batches(batches, args.accum_steps, proc.device)
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
            save_now = done % schedule.save_every == 0 or done == last
            if log_now or save_now:  # the only synchronisations in the loop
                nonfinite.check()  # never log or save a model that is not finite
            if log_now:
                loss = distributed.mean_over_ranks(loss)  # every rank takes part
                record = {"step": done, "epoch": step // schedule.steps_per_epoch,
                          "loss": loss.item(), "lr": lr,
                          "logit_scale": model.logit_scale.exp().item()}
                log.write(record, args.log_every * schedule.global_batch)
            if save_now:
                epoch = done // schedule.steps_per_epoch
                save_step(args, run_dir, model, optimizer, done, epoch, skipped, identity,
                          proc.is_main)
            if zero_shot and (done % args.zeroshot_every == 0 or done == total):
                log.write_zero_shot(done, *zero_shot())


def finish(args, model, tokenizer, manifest, skipped, started, run_dir, device):
    """Rank 0's: fingerprint the final weights, close the manifest, and score the demo."""
    sha = weights_sha256(model.state_dict())
    print(f"final weights sha256 {sha}")
    manifest.update({"final_weights_sha256": sha, "skipped_nonfinite_steps": skipped})
    demo_csv = os.path.join(demo_data.DEMO_DIR, "train.csv")
    if os.path.abspath(args.train_data) == os.path.abspath(demo_csv):
        manifest["demo_zero_shot"] = evaluate.demo_zero_shot(model, tokenizer, device)
    finish_invocation(manifest, run_dir, manifest["total_steps"], started)


def run(args, run_dir, proc, resume_point, started):
    """The phases of a run, in a run folder this job holds."""
    if proc.is_main:
        run_folder.remove_leftovers(run_dir)  # of writes a killed run left midway
    clock = Stopwatch()
    train_data = prepare_data(args, run_dir, proc, clock)
    tokenizer, model, optimizer = build_model(args, train_data.rows, run_dir, proc, clock)
    schedule = make_schedule(args, len(train_data.samples), proc.world)
    identity = run_folder.run_identity(args, schedule, train_data)
    start_step, skipped = resume_or_start(resume_point, model, optimizer, identity, proc)
    last = last_step(args, schedule, start_step)
    ddp_model = distribute(model, args, proc.world)
    loader = make_loader(args, train_data, tokenizer, model.config, schedule, start_step, proc)
    clock.lap("resume and loader")
    if proc.is_main:
        phases = ", ".join(f"{phase} {seconds:.1f} s" for phase, seconds in clock.seconds.items())
        print(f"start-up: {phases}")
        manifest = write_manifest(args, run_dir, proc, schedule, model.config, tokenizer,
                                  train_data, start_step, clock.seconds)
        # Lines a killed run wrote after its last checkpoint are redone.
        run_folder.keep_log_until(os.path.join(run_dir, "log.jsonl"), start_step)
        print(f"run folder {run_dir}: {len(train_data.samples)} pairs, {proc.world} process(es) x "
              f"{args.batch_size} x {args.accum_steps} = global batch {schedule.global_batch}, "
              f"{schedule.total_steps} steps")
        guarantee = world_size_guarantee(args, proc.world)
        print(f"another split of this global batch (RULE 3): {guarantee['level']}, "
              f"{guarantee['why']}")

    zero_shot = None  # rank 0 scores for --zeroshot-every
    if args.zeroshot_every and proc.is_main:
        zero_shot = evaluate.zero_shot_scorer(model, tokenizer, dict(args.zeroshot_data),
                                              proc.device)
    train(args, model, ddp_model, optimizer, loader, schedule, start_step, last, skipped,
          identity, run_dir, proc, zero_shot)
    if proc.is_main and last < schedule.total_steps:  # stopped early: to be continued
        finish_invocation(manifest, run_dir, last, started)
    elif proc.is_main:
        finish(args, model, tokenizer, manifest, skipped, started, run_dir, proc.device)
    if dist.is_initialized():
        dist.destroy_process_group()
    return model


def main(argv=None):
    args = parse_args(argv)
    started = time.time()
    proc = distributed.setup_distributed(args.dist_timeout)
    # A resume continues the run its checkpoint recorded, with that run's flags.
    resume_point = run_folder.find_resume_point(args, proc)
    if resume_point:
        path, checkpoint = resume_point
        args = continue_recorded_run(args, given_flags(argv), checkpoint.get("args", {}), path)
    seed_everything(args.seed, args.deterministic)
    keep_freed_memory(proc.device)
    args.precision = args.precision or default_precision(proc.device)

    run_dir = run_folder.make_run_dir(args)
    with run_folder.hold_run_folder(run_dir, proc):  # one job per run folder
        return run(args, run_dir, proc, resume_point, started)


if __name__ == "__main__":
    run_main(main)
