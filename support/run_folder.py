"""The run folder: RUN/checkpoints (written atomically, the newest two kept), the random states a
checkpoint carries, the identity that a resume must match (RULE 8), and the log trimmed back to
the step a resume starts from."""
import contextlib
import fcntl
import io
import json
import os
import random
import socket
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from support.distributed import gather_objects
from support.errors import UsageError
from support.files import atomic_write, remove
from support.pretrained import read_weights_file

def remove_leftovers(run_dir):
    """The temporary files and folders (NAME.tmp<pid>) of atomic writes a killed run left in RUN
    or RUN/checkpoints."""
    run_dir = Path(run_dir)
    for entry in [*run_dir.glob("*.tmp[0-9]*"), *run_dir.glob("checkpoints/*.tmp[0-9]*")]:
        remove(entry)


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
    args.output_dir = run_dir  # recorded, so that `--resume CHECKPOINT` alone finds it again
    return run_dir


JOB_LOCK = "job.lock"  # in RUN: who holds the folder


@contextlib.contextmanager
def hold_run_folder(run_dir, proc):
    """For the block, this job alone writes into `run_dir`: rank 0 holds an advisory lock on
    RUN/job.lock, which the kernel lets go when the holder exits or is killed (kill -9 too), so
    a resume after a crash is never blocked by a file to clean by hand. A second job on a folder
    that a live job holds is refused at once, naming the holder."""
    # RULE 8: two jobs writing checkpoints and log lines into one folder would interleave them.
    lock = None
    refusal = None
    if proc.is_main:
        lock = open(os.path.join(run_dir, JOB_LOCK), "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another job"
            lock.close()
            refusal = (f"{run_dir} is held by {holder}. One job per run folder: wait for it, or "
                       "stop every process of it (docs/troubleshooting.md), then --resume auto.")
        else:
            lock.truncate(0)
            lock.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                       f"{datetime.now():%Y-%m-%d %H:%M:%S} ({' '.join(sys.argv)})\n")
            lock.flush()
    refusal = gather_objects(refusal)[0]  # every rank stops, not rank 0 alone
    if refusal:
        raise UsageError(refusal)
    try:
        yield
    finally:
        if lock:
            lock.close()  # closing the file lets the lock go


def keep_log_until(path, step):
    """Drop the lines of the log.jsonl at `path` that come after `step`."""
    if os.path.exists(path):
        lines = [line for line in open(path) if json.loads(line)["step"] <= step]
        atomic_write(path, lambda tmp: open(tmp, "w").writelines(lines))


def rng_states():
    # RULE 8: every random generator's state goes into the checkpoint.
    numpy_state = np.random.get_state()  # ("MT19937", keys, position, ...)
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(numpy_state[1].copy()),
            "numpy_pos": int(numpy_state[2]), "python": list(random.getstate()[1]), "cuda": cuda}


def rng_states_of_every_rank():
    """[rank 0's rng_states(), rank 1's, ...]: what a checkpoint keeps, so that each rank
    resumes its own."""
    # As bytes: all_gather_object cannot unpickle a tensor's storage (torch 2.14).
    mine = io.BytesIO()
    torch.save(rng_states(), mine)
    gathered = gather_objects(mine.getvalue())
    return [torch.load(io.BytesIO(states), weights_only=True) for states in gathered]


def set_rng_states(saved, proc):
    """Restore this rank's random states from a checkpoint's list of every rank's.

    On another number of processes than the checkpoint's, rank r no longer holds the
    micro-batches the saved rank r held (RULE 3 hands them out anew), so no saved rank is
    this one's: every rank takes rank 0's, as every rank started from the same seed."""
    if isinstance(saved, dict):  # a checkpoint of an older version: rank 0's alone
        saved = [saved] * proc.world
    states = saved[0]
    if len(saved) == proc.world:
        states = saved[proc.rank]
    elif proc.is_main:
        print(f"note: the checkpoint holds the random states of {len(saved)} process(es), this "
              f"run has {proc.world}: every rank resumes rank 0's")
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
    checkpoints = step_checkpoints(os.path.join(run_dir, "checkpoints"))
    for _, path in sorted(checkpoints, reverse=True):
        try:
            return path, read_weights_file(path)
        except UsageError as e:
            print(f"warning: skipping {e}")
    return None, None


def find_resume_point(args, proc):
    """(path, checkpoint) that --resume names, loaded on every rank; None where there is none
    (no --resume, or --resume auto in a folder without a checkpoint: a fresh start)."""
    if not args.resume:
        return None
    path = args.resume
    checkpoint = None
    if args.resume == "auto":
        if proc.is_main:
            path, checkpoint = find_resume_checkpoint(args.output_dir)
        # RULE 8: rank 0 chooses and every rank loads that one, so ranks with node-local disks or
        # a stale network-filesystem cache never start from different checkpoints.
        path = gather_objects(path)[0]
    if path and checkpoint is None:
        checkpoint = read_weights_file(path)
    return (path, checkpoint) if checkpoint else None
