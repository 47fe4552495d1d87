"""The process group: joining the job torchrun started (gloo on CPU, NCCL on GPU), and the few
collectives the run's bookkeeping needs (a barrier, a minimum, a mean, a gather of objects)."""
import datetime
import os
from typing import NamedTuple

import torch
import torch.distributed as dist

from support.errors import UsageError

def barrier():
    if dist.is_initialized():
        dist.barrier()


def min_over_ranks(tensor):
    """`tensor` replaced, in place, by its minimum over all ranks: a bool stays true only if true
    on every rank."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor


def mean_over_ranks(tensor):
    """The mean of `tensor` over all ranks: a sum (in place), then a division; gloo has no
    average."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor
    dist.all_reduce(tensor)
    return tensor / dist.get_world_size()


def gather_objects(value):
    """[value of rank 0, value of rank 1, ...] on every rank."""
    if not dist.is_initialized():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


class Process(NamedTuple):
    """This process's place in the job."""
    rank: int
    world: int  # the number of processes
    device: torch.device

    @property
    def is_main(self):
        """Rank 0 alone writes the run's files and prints."""
        return self.rank == 0


def setup_distributed(timeout_minutes=60):
    """torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; `python train.py` is world size 1.
    A collective that waits longer than `timeout_minutes` stops the run with an error: NCCL's
    own default, 10 minutes, is shorter than what rank 0 may do alone before a barrier."""
    if "RANK" not in os.environ:
        return Process(0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ["LOCAL_RANK"])
    world = int(os.environ["WORLD_SIZE"])
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    # RULE 8: torchrun lends us its own store, which outlives an elastic restart with the dead
    # group's addresses in it, so each attempt keys its group apart by its restart count. That
    # count is one node's own: restarts on several nodes need torchrun to start a fresh store for
    # each attempt instead.
    shared = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    several_nodes = int(os.environ.get("GROUP_WORLD_SIZE", 1)) > 1
    if shared and several_nodes and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0)) > 0:
        raise UsageError("--max-restarts on several nodes: start torchrun with --rdzv-backend=c10d "
                         "and with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its environment, or a "
                         "restart would hang (README)")
    store = next(dist.rendezvous("env://"))[0]
    if shared:
        store = dist.PrefixStore(f"attempt{os.environ['TORCHELASTIC_RESTART_COUNT']}", store)
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if device.type == "cuda":
        dist.init_process_group("nccl", store=store, rank=rank, world_size=world, device_id=device,
                                timeout=timeout)
    else:
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
    return Process(rank, world, device)
