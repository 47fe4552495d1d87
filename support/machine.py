"""This machine: the precision its hardware runs fast, a malloc setting that keeps freed memory
for the next step, and the description (library versions, git commit, devices) that the manifest
records (RULE 9)."""
import ctypes
import os
import platform
import subprocess
import sys

import numpy as np
import torch

# The repository: support/'s parent.
REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def git(*command):
    """The output of a git command run in this repository, or None where it fails."""
    out = subprocess.run(["git", *command], cwd=REPO_DIR, capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


def cpu_model():
    """The CPU's model name ("Intel(R) Xeon(R) Platinum 8480+"), which platform.processor() does
    not give on Linux: another model may run other kernels, so other bits. None where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


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
                       "cpu": platform.processor(), "cpu_model": cpu_model(),
                       "gpus": gpus}}


def train_command(nproc):
    """The command that starts train.py on `nproc` processes of this machine, as users start
    it: `python train.py` for one, torchrun (its module, so no PATH is needed) for several."""
    command = [sys.executable]
    if nproc > 1:
        command += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return command + [os.path.join(REPO_DIR, "train.py")]
