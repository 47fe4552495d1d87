"""The gradients' sum over processes along one binary tree over the rank index (RULE 3): a DDP
communication hook with recursive halving and doubling, and the guarantee that says which splits
of a global batch give the same bits. train.TreeSum adds the micro-batches inside a process along
the same tree; this file carries the tree across processes."""
import contextlib

import torch
import torch.distributed as dist

from support.errors import UsageError

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
    """A future that holds `tensor`, done. On CUDA it is made with the tensor's device, so that
    set_result records an event on the current stream, and DDP's finalize (a wait on the
    future) makes the compute stream wait for that event, once, at the end of backward."""
    devices = [tensor.device] if tensor.is_cuda else None
    future = torch.futures.Future(devices=devices)
    future.set_result(tensor)
    return future


SIDE_STREAMS = {}  # CUDA device -> the stream the tree's messages and sums run on


def side_stream(buffer):
    """The context the hook works in: on CUDA, a stream of its own that first waits for the
    current (compute) stream; on the CPU, nothing.

    As PyTorch's mixed_precision_hooks.py does: NCCL's request.wait() makes the *current*
    stream wait for the message, so waiting on the compute stream would hold every backward
    kernel queued after this bucket; on a side stream, backward runs on while the tree's
    2 log2(N) rounds go by. The streams' order gives the same sums in the same order: the bits
    do not change."""
    if not buffer.is_cuda:
        return contextlib.nullcontext()
    stream = SIDE_STREAMS.get(buffer.device)
    if stream is None:
        stream = torch.cuda.Stream(buffer.device)
        SIDE_STREAMS[buffer.device] = stream
    stream.wait_stream(torch.cuda.current_stream(buffer.device))  # the bucket is written
    return torch.cuda.stream(stream)


def accumulate(gradients, bucket):
    """Add this backward's gradients of `bucket` to the micro-batches' trees; True once all
    accum_steps are in, the bucket then holding their sum, else False (the bucket zeroed).

    A gradient that starts a subtree of its own is kept, so it is copied: the whole bucket in
    one copy. One that joins a subtree at once is only read, so it is not: at most log2(K)
    copies live, one fewer than a copy per micro-batch would keep (docs/performance.md).
    Trees are kept per parameter, not per bucket: DDP rebuilds its buckets after the first
    backward, midway through the first step's micro-batches."""
    buffer = bucket.buffer()
    views = bucket.gradients()  # each parameter's gradient: a view into the buffer
    parameters = bucket.parameters()
    terms = views
    if gradients.keeps_next(parameters[0]):
        copy = buffer.clone()
        start = buffer.storage_offset()
        terms = [copy[v.storage_offset() - start:][:v.numel()].view_as(v) for v in views]
    totals = [gradients.add(p, term) for p, term in zip(parameters, terms)]
    if totals[0] is None:
        buffer.zero_()  # so that the next backward writes 0 + g = g
        return False
    for view, total in zip(views, totals):
        view.copy_(total)
    return True


def tree_all_reduce_hook(gradients, bucket):
    """DDP communication hook: the mean over ranks of a bucket of gradients, added along one
    tree over the global micro-batch index, not in the order of DDP's all-reduce (a ring's).

    `gradients`: this rank's MicroBatchGradients. DDP calls the hook after each backward (no
    no_sync in train_step): it adds each micro-batch's gradients to their trees and zeroes the
    bucket; after the last, it holds this rank's micro-batches r*K .. r*K+K-1
    (data.GlobalBatchSampler) summed, one subtree of the tree, and communicates. The work runs
    on a side stream, so that on CUDA the rest of backward overlaps it as it overlaps DDP's
    all-reduce (on 2 gloo processes, where nothing overlaps, a step costs 1-5% more:
    bench.py --ddp 2).
    """
    buffer = bucket.buffer()  # the bucket's gradients, flat
    with side_stream(buffer):
        if gradients.accum_steps > 1 and not accumulate(gradients, bucket):
            return finished(buffer)
        world = dist.get_world_size()
        if world & (world - 1):  # not a power of two: no tree to match, float rounding
            dist.all_reduce(buffer)
        else:
            tree_all_reduce(buffer)
        # Inside the stream's context: the future's event marks this stream's work.
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
    if args.reduction == "ddp":
        return {"level": rounding, "why": "--reduction ddp: DDP's all-reduce adds the ranks' "
                "gradients in an order of its own"}
    if not args.deterministic or args.compile:
        return {"level": rounding, "why": "--no-deterministic or --compile kernels"}
    if world & (world - 1) or K & (K - 1):
        return {"level": rounding, "why": f"{world} process(es) x --accum-steps {K}: "
                "not both powers of two, so sums and divisions round differently"}
    return {"level": "bitwise", "why": "any power-of-two number of processes x --accum-steps "
            "at this --batch-size, on the same hardware, libraries and threads per process"}


def uses_tree_hook(args, world):
    """Whether DDP sums the gradients with tree_all_reduce_hook: only where its bits are
    promised. Elsewhere DDP's own all-reduce, which overlaps backward, costs less."""
    # RULE 3: pay for the tree only where the guarantee says bitwise.
    return world > 1 and world_size_guarantee(args, world)["level"] == "bitwise"


def refuse_python_reducer():
    """Refuse, in one line, the compiled-autograd DDP that calls a hook per parameter."""
    # DDP reads this setting when it is built, with or without --compile: its python_reducer
    # calls a hook with (gradient, parameter), where the tree needs DDP's buckets.
    if torch._dynamo.config.optimize_ddp == "python_reducer":
        raise UsageError("torch._dynamo.config.optimize_ddp = 'python_reducer' calls DDP's hook "
                         "per parameter, which RULE 3's tree cannot sum: unset it, or pass "
                         "--reduction ddp (float rounding).")
