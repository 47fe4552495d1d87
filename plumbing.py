"""Plumbing that is not the lesson: one error type for mistakes a user can fix, files written
atomically, the torchrun launcher and its workarounds, and a description of the machine for the
manifest. train.py, data.py, evaluate.py and bench.py lean on it; nothing here is about CLIP.
"""
import contextlib
import ctypes
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

REPO_DIR = os.path.dirname(os.path.abspath(__file__))


class UsageError(Exception):
    """A mistake the user can fix (a flag, a file, a row). Raised where it is found; the entry
    points turn it into one line on stderr and exit status 2, never a traceback."""


def run_main(main):
    """Call an entry point's `main`; a UsageError becomes `error: ...` on one line, exit status 2."""
    try:
        return main()
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)


# ----------------------------------------------------------------------------- files

def atomic_write(path, write):
    """write(temporary path), a file or a new folder, then rename it into place. RULE 8: a kill leaves the
    old file intact, and no half-written one that a resume would load (remove_leftovers tidies up after it)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:  # disk full, no permission: say so, and leave no partial file behind
        raise UsageError(f"cannot write {path}: {e.strerror or e}. Free some space or choose another output "
                         "folder; the files written before are intact.") from None
    finally:
        with contextlib.suppress(OSError):  # tidying up must not hide the error above
            shutil.rmtree(tmp) if os.path.isdir(tmp) else os.remove(tmp)


def remove_leftovers(run_dir):
    """The temporary files and folders (NAME.tmp<pid>) of atomic writes a killed run left in RUN or RUN/checkpoints."""
    for entry in [*Path(run_dir).glob("*.tmp[0-9]*"), *Path(run_dir).glob("checkpoints/*.tmp[0-9]*")]:
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def write_json(path, obj):
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# ----------------------------------------------------------------------------- the launcher

def setup_distributed():
    """torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; `python train.py` is world size 1."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # RULE 8: torchrun lends us its own store, which outlives an elastic restart with the dead group's addresses
    # in it, so each attempt keys its group apart by its restart count. That count is one node's own: restarts
    # on several nodes need torchrun to start a fresh store for each attempt instead.
    shared = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    several_nodes = int(os.environ.get("GROUP_WORLD_SIZE", 1)) > 1
    if shared and several_nodes and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0)) > 0:
        raise UsageError("--max-restarts on several nodes: start torchrun with --rdzv-backend=c10d and with "
                         "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its environment, or a restart would hang (README)")
    store = next(dist.rendezvous("env://"))[0]
    if shared:
        store = dist.PrefixStore(f"attempt{os.environ['TORCHELASTIC_RESTART_COUNT']}", store)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank, world_size=world,
                            device_id=device if device.type == "cuda" else None)
    return rank, world, device


def keep_freed_memory(device):
    """Ask glibc's malloc to keep freed memory for the next step instead of handing it back to the kernel.
    By default each large block (activations, the embedding's gradient) is unmapped when freed, so every step
    faults the same pages in again, zeroed by the kernel: ~7% of an fp32 CPU step of bench.py's reference
    configuration, at the same peak memory. Data-loader workers started with fork inherit it. Returns whether
    it took effect: GPU runs (activations in CUDA's caching allocator) and other C libraries are left alone."""
    if device.type != "cpu":
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from <malloc.h>
    try:
        libc = ctypes.CDLL("libc.so.6")
        # Large blocks come from the heap too, where freed memory is reused; the heap shrinks only when
        # 1 GiB at its top is free. mallopt returns 1 on success.
        return libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 2**30) == 1
    except (OSError, AttributeError):  # no libc.so.6, or one without mallopt
        return False


def environment(device):
    """Library versions, the code's git commit and the hardware: for the manifest (RULE 9)."""
    import PIL, tokenizers, torchvision, transformers
    def git(*cmd):
        out = subprocess.run(["git", *cmd], cwd=REPO_DIR, capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else None
    cuda = torch.cuda.is_available()
    return {"versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "torchvision": torchvision.__version__, "transformers": transformers.__version__,
                         "tokenizers": tokenizers.__version__, "numpy": np.__version__, "pillow": PIL.__version__,
                         "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if cuda else None,
                         "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None},
            "git": {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))},
            "device": {"type": device.type, "torch_threads": torch.get_num_threads(), "cpu": platform.processor(),
                       "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}}


def barrier():
    if dist.is_initialized():
        dist.barrier()


def min_over_ranks(tensor):
    """`tensor` replaced, in place, by its minimum over all ranks: a bool stays true only if true on every rank."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor


def gather_objects(value):
    """[value of rank 0, value of rank 1, ...] on every rank."""
    if not dist.is_initialized():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values
