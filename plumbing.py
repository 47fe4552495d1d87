"""Plumbing that is not the lesson: one error type for mistakes a user can fix, the collectives,
files written atomically, the torchrun launcher and its workarounds, the run folder and the loop's
bookkeeping, and a description of the machine for the manifest. train.py, data.py, evaluate.py
and bench.py lean on it; nothing here is about CLIP.
"""
import contextlib
import ctypes
import hashlib
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

REPO_DIR = os.path.dirname(os.path.abspath(__file__))


class UsageError(Exception):
    """A mistake the user can fix (a flag, a file, a row). Raised where it is found; the entry
    points turn it into one line on stderr and exit status 2, never a traceback."""


def run_main(main):
    """Call an entry point's `main`; a UsageError becomes `error: ...` on one line and exit
    status 2."""
    try:
        return main()
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)


# ----------------------------------------------------------------------------- collectives

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


# ----------------------------------------------------------------------------- files

def remove(path):
    """Delete a file or a whole folder."""
    if os.path.isdir(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


def atomic_write(path, write):
    """write(temporary path), a file or a new folder, then rename it into place."""
    # RULE 8: a kill leaves the old file intact, and no half-written one that a resume would load
    # (remove_leftovers tidies up after it).
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write(tmp)
        flush_to_disk(tmp)
        os.replace(tmp, path)
        fsync(os.path.dirname(os.path.abspath(path)))  # the rename itself
    except OSError as e:  # disk full, no permission: say so, and leave no partial file behind
        raise UsageError(f"cannot write {path}: {e.strerror or e}. Free some space or choose "
                         "another output folder; the files written before are intact.") from None
    finally:
        with contextlib.suppress(OSError):  # tidying up must not hide the error above
            remove(tmp)


def flush_to_disk(path):
    """fsync a new file, or a new folder's files and then the folder."""
    # RULE 8: the bytes reach the disk before the rename makes them the checkpoint, so a power
    # loss cannot leave an empty file under the name of the latest checkpoint.
    if os.path.isdir(path):
        for name in os.listdir(path):
            fsync(os.path.join(path, name))
    fsync(path)


def fsync(path):
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def remove_leftovers(run_dir):
    """The temporary files and folders (NAME.tmp<pid>) of atomic writes a killed run left in RUN
    or RUN/checkpoints."""
    run_dir = Path(run_dir)
    for entry in [*run_dir.glob("*.tmp[0-9]*"), *run_dir.glob("checkpoints/*.tmp[0-9]*")]:
        remove(entry)


def write_json(path, obj):
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def weights_sha256(state_dict):
    """A fingerprint of the weights alone: names, dtypes, shapes and bytes, in a fixed order."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------- the launcher

class Process(NamedTuple):
    """This process's place in the job."""
    rank: int
    world: int  # the number of processes
    device: torch.device

    @property
    def is_main(self):
        """Rank 0 alone writes the run's files and prints."""
        return self.rank == 0


def setup_distributed():
    """torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; `python train.py` is world size 1."""
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
    if device.type == "cuda":
        dist.init_process_group("nccl", store=store, rank=rank, world_size=world, device_id=device)
    else:
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    return Process(rank, world, device)


def default_precision(device):
    """bf16 autocast where the hardware multiplies bf16 natively: GPUs since Ampere, CPUs with AMX
    or AVX512-BF16. There it trains the demo about twice as fast as fp32 with the same zero-shot
    accuracy (README); elsewhere bf16 would be emulated and slow, so fp32."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if not os.path.exists("/proc/cpuinfo"):
        return "fp32"
    cpu_flags = set(open("/proc/cpuinfo").read().split())
    return "bf16" if {"amx_bf16", "avx512_bf16"} & cpu_flags else "fp32"


def keep_freed_memory(device):
    """Ask glibc's malloc to keep freed memory for the next step instead of handing it back to the
    kernel. By default each large block (activations, the embedding's gradient) is unmapped when
    freed, so every step faults the same pages in again, zeroed by the kernel: ~7% of an fp32 CPU
    step of bench.py's reference configuration, at the same peak memory. Data-loader workers
    started with fork inherit it. Returns whether it took effect: GPU runs (activations in CUDA's
    caching allocator) and other C libraries are left alone."""
    if device.type != "cpu":
        return False
    M_TRIM_THRESHOLD = -1  # from <malloc.h>
    M_MMAP_MAX = -4
    try:
        libc = ctypes.CDLL("libc.so.6")
        # Large blocks come from the heap too, where freed memory is reused; the heap shrinks only
        # when 1 GiB at its top is free. mallopt returns 1 on success.
        no_mmap = libc.mallopt(M_MMAP_MAX, 0) == 1
        return no_mmap and libc.mallopt(M_TRIM_THRESHOLD, 2**30) == 1
    except (OSError, AttributeError):  # no libc.so.6, or one without mallopt
        return False


# ----------------------------------------------------------------------------- the run folder

def step_checkpoints(folder):
    """[(step, path)] of the step_<N>.pt files in `folder`."""
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return [(int(n[5:-3]), os.path.join(folder, n)) for n in names
            if n.startswith("step_") and n.endswith(".pt") and n[5:-3].isdigit()]


def make_run_dir(args):
    """The run folder, the same on every rank; one with checkpoints is continued only with
    --resume."""
    run_dir = args.output_dir
    if not run_dir:
        name = os.path.basename(args.model).removesuffix(".json")
        now = datetime.now().strftime("%Y%m%d-%H%M%S")
        # Rank 0's clock names it for everybody.
        run_dir = gather_objects(os.path.join("runs", f"{name}-seed{args.seed}-{now}"))[0]
    if not args.resume and step_checkpoints(os.path.join(run_dir, "checkpoints")):
        raise UsageError(f"{run_dir} already holds checkpoints: pass --resume auto to continue "
                         "it, or another --output-dir.")
    try:
        os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
    except OSError as e:
        raise UsageError(f"--output-dir {run_dir}: cannot create it ({e.strerror}). "
                         "Choose a writable folder.")
    return run_dir


def keep_log_until(path, step):
    """Drop the lines of the log.jsonl at `path` that come after `step`."""
    if os.path.exists(path):
        lines = [line for line in open(path) if json.loads(line)["step"] <= step]
        atomic_write(path, lambda tmp: open(tmp, "w").writelines(lines))


# ----------------------------------------------------------------------------- checkpoints

def rng_states():
    # RULE 8: every random generator's state goes into the checkpoint.
    numpy_state = np.random.get_state()  # ("MT19937", keys, position, ...)
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(numpy_state[1].copy()),
            "numpy_pos": int(numpy_state[2]), "python": list(random.getstate()[1]), "cuda": cuda}


def set_rng_states(states):
    # RULE 8: a resumed run draws the random numbers the uninterrupted one would have drawn.
    torch.set_rng_state(states["torch"])
    np.random.set_state(("MT19937", states["numpy"].numpy(), states["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(states["python"]), None))
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(run_dir, checkpoint, keep=2):
    """checkpoints/step_<N>.pt, then latest.pt pointing at it; older step files beyond `keep` go."""
    # RULE 8: each file is written under a temporary name and renamed, so a kill during a save
    # leaves the previous checkpoint intact.
    folder = os.path.join(run_dir, "checkpoints")
    path = os.path.join(folder, f"step_{checkpoint['step']}.pt")
    atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))

    def link_latest(tmp):  # a hard link costs no second copy; fall back to a copy where links fail
        try:
            os.link(path, tmp)
        except OSError:
            torch.save(checkpoint, tmp)

    atomic_write(os.path.join(folder, "latest.pt"), link_latest)
    for _, old in sorted(step_checkpoints(folder))[:-keep]:
        os.remove(old)


# ----------------------------------------------------------------------------- the loop's records

class Log:
    """log.jsonl and the progress bar, both rank 0's; a `with` block closes the bar, so an error
    that stops the run prints on a line of its own."""

    def __init__(self, path, total_steps, start_step, is_main):
        self.path = path
        self.is_main = is_main
        self.progress = tqdm(total=total_steps, initial=start_step, disable=not is_main,
                             dynamic_ncols=True, mininterval=2)
        self.tick = time.time()

    def __enter__(self):
        return self

    def __exit__(self, *exception):
        self.progress.close()

    def write(self, record, samples):
        """`record` and samples_per_s, over the `samples` trained on since the last line."""
        record["samples_per_s"] = samples / (time.time() - self.tick)
        self.tick = time.time()
        if self.is_main:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            self.progress.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}")


class NonFiniteLoss:
    """Stops the run at a non-finite loss or gradient without a synchronisation per step.

    Each step's verdict stays on the device, folded into the first bad step; `check` reads it
    where the loop synchronises anyway, before a log line or a checkpoint, so a non-finite model
    is never saved. --skip-nonfinite N instead skips a bad step's update, which needs every rank's
    verdict at once: a synchronisation per step, paid only when asked.
    """

    def __init__(self, limit, total_steps, skipped, run_dir, device):
        self.limit = limit
        self.skipped = skipped  # the steps skipped so far; checkpoints keep them
        self.run_dir = run_dir
        self.none = total_steps + 1  # "no bad step yet"
        self.first_bad_step = torch.tensor(self.none, device=device)

    def skip(self, loss, gradient_norm, step):
        """Whether to skip the update of `step` (only with --skip-nonfinite)."""
        finite = torch.isfinite(loss) & torch.isfinite(gradient_norm)
        if self.limit and not min_over_ranks(finite):
            self.skipped.append(step)
            if len(self.skipped) > self.limit:
                raise UsageError(f"non-finite loss or gradient at steps {self.skipped}, more "
                                 f"than --skip-nonfinite {self.limit}; the last good checkpoint "
                                 f"is kept in {self.run_dir}/checkpoints.")
            return True
        bad_step = torch.where(finite, self.none, step)
        self.first_bad_step = torch.minimum(self.first_bad_step, bad_step)
        return False

    def check(self):
        """Raise if the loss was not finite on any rank at any step so far: a synchronisation."""
        first = min_over_ranks(self.first_bad_step).item()
        if first != self.none:
            raise UsageError(f"the loss or its gradient was not finite at step {first}; the last "
                             f"good checkpoint is kept in {self.run_dir}/checkpoints. Lower --lr, "
                             "set --grad-clip-norm, or pass --skip-nonfinite N.")


# ----------------------------------------------------------------------------- the machine

def git(*command):
    """The output of a git command run in this repository, or None where it fails."""
    out = subprocess.run(["git", *command], cwd=REPO_DIR, capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


def environment(device):
    """Library versions, the code's git commit and the hardware: for the manifest."""
    # RULE 9: a result without its library versions, code and hardware is not reproducible.
    # Imported here, not at the top: only the manifest needs them, and transformers loads slowly.
    import PIL
    import tokenizers
    import torchvision
    import transformers
    cuda = torch.cuda.is_available()
    versions = {
        "python": platform.python_version(), "torch": torch.__version__,
        "torchvision": torchvision.__version__, "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__, "numpy": np.__version__, "pillow": PIL.__version__,
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if cuda else None,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None}
    commit = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"versions": versions, "git": {"commit": commit, "dirty": dirty},
            "device": {"type": device.type, "torch_threads": torch.get_num_threads(),
                       "cpu": platform.processor(), "gpus": gpus}}
