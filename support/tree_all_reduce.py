"""The gradients' sum over processes along one binary tree over the rank index (RULE 3): a DDP
communication hook with recursive halving and doubling, and the guarantee that says which splits
of a global batch give the same bits. train.TreeSum adds the micro-batches inside a process along
the same tree; this file carries the tree across processes."""
import torch
import torch.distributed as dist

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
