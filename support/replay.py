"""`verify.py RUN`: does this run reproduce here? Replay the interval between two of its saved
checkpoints with the recorded flags, data and tokenizer, as a real train.py job in a temporary
folder, and compare with the later checkpoint and the log (support/compare_runs.py). Nothing is
written into RUN, and RUN may go on training meanwhile: the two checkpoints and the tokenizer are
hard-linked (or copied) out of it first.

    python verify.py RUN [--from-step A --to-step B] [--nproc N]
"""
import os
import shutil
import subprocess
import tempfile
import time

from support import compare_runs
from support.errors import UsageError
from support.files import file_sha256
from support.machine import train_command

LOGGED = ["loss", "lr", "logit_scale"]  # the log's fields that a replay must repeat to the bit


def choose_interval(run_dir, from_step, to_step):
    """(A, B): two saved steps of RUN, by default its last two."""
    steps = sorted(compare_runs.saved_steps(run_dir))
    folder = os.path.join(run_dir, "checkpoints")
    if len(steps) < 2:
        raise UsageError(f"{folder} holds {len(steps)} step checkpoint(s) {steps}; a replay needs "
                         "two. Train on (or resume) with --save-every until two are saved.")
    for step in (from_step, to_step):
        if step is not None and step not in steps:
            raise UsageError(f"{folder} has no step_{step}.pt (saved steps: {steps}). Choose "
                             "--from-step and --to-step among them.")
    if to_step is None:
        later = [s for s in steps if from_step is None or s > from_step]
        to_step = later[0] if from_step is not None and later else steps[-1]
    if from_step is None:
        earlier = [s for s in steps if s < to_step]
        from_step = earlier[-1] if earlier else None
    if from_step is None or from_step >= to_step:
        raise UsageError(f"--from-step {from_step} --to-step {to_step}: the first must be an "
                         f"earlier saved step (saved steps: {steps}).")
    return from_step, to_step


def link_or_copy(source, target):
    """A hard link (no bytes copied, and it outlives RUN deleting the file), else a copy: the
    temporary folder is on another file system than RUN (set TMPDIR to one on RUN's to link)."""
    try:
        os.link(source, target)
    except FileNotFoundError:
        raise UsageError(f"{source} went away while verify.py read it (the run deletes old "
                         "checkpoints as it trains). Run verify.py again.")
    except OSError:  # another file system, or no links there
        shutil.copy2(source, target)


def stage(run_dir, from_step, to_step, temp):
    """The replay's run folder (checkpoint A and RUN's tokenizer) and the reference checkpoint
    B, in `temp`; returns their paths."""
    replay_dir = os.path.join(temp, "replay")
    os.makedirs(os.path.join(replay_dir, "checkpoints"))
    os.makedirs(os.path.join(temp, "reference"))
    start = os.path.join(replay_dir, "checkpoints", f"step_{from_step}.pt")
    reference = os.path.join(temp, "reference", f"step_{to_step}.pt")
    for step, target in ((from_step, start), (to_step, reference)):
        link_or_copy(os.path.join(run_dir, "checkpoints", f"step_{step}.pt"), target)
    tokenizer = os.path.join(run_dir, "tokenizer")
    if not os.path.isdir(tokenizer):
        raise UsageError(f"{tokenizer}: missing; a replay must tokenize as the run did. Restore "
                         "the run folder's tokenizer/ from a copy.")
    shutil.copytree(tokenizer, os.path.join(replay_dir, "tokenizer"), copy_function=link_or_copy)
    return replay_dir, start, reference


def where_the_data_is(run_dir, manifest, args, train_data, image_root):
    """(CSV, image folder or None) to replay with: the recorded ones, or those given; data that
    is not there is refused in one line."""
    csv = train_data or manifest.get("train_data", {}).get("path") or args.get("train_data")
    root = image_root or args.get("image_root")
    if not csv or not os.path.isfile(csv):
        raise UsageError(f"{csv}: the training data of {run_dir} is not there (moved or "
                         "deleted?). Pass --train-data CSV (and --image-root DIR) where it is "
                         "now.")
    if root and not os.path.isdir(root):
        raise UsageError(f"{root}: the image folder of {run_dir} is not there (moved?). Pass "
                         "--image-root DIR where it is now.")
    return os.path.abspath(csv), root and os.path.abspath(root)


def replay_split(manifest, args, entries, nproc):
    """(processes, --accum-steps): the recorded split, or `nproc` with the accumulation that
    keeps the recorded global batch; a number of processes that cannot is refused."""
    processes, batch, accum = compare_runs.split(entries[-1])
    if nproc is None:
        return processes, accum
    global_batch = manifest["global_batch_size"]
    per_step = args["batch_size"] * nproc
    if nproc < 1 or global_batch % per_step:
        raise UsageError(f"--nproc {nproc}: the recorded global batch {global_batch} (--batch-size "
                         f"{args['batch_size']} x {processes} process(es) x --accum-steps "
                         f"{accum}) is no multiple of {args['batch_size']} x {nproc}. Choose a "
                         "number of processes that divides it.")
    return nproc, global_batch // per_step


def launch(flags, processes, threads, log_path):
    """train.py as users start it, `python train.py` or torchrun; returns its exit status."""
    command = [*train_command(processes), *map(str, flags)]
    # The recorded threads per process: another count may add in another order.
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(log_path, "w") as log:
        return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode


def replay(run_dir, start, replay_dir, to_step, data, split_here, threads):
    """Train from checkpoint `start` to `to_step` in `replay_dir`; a failure is one line."""
    csv, root = data
    # No zero-shot scores (the run's --zeroshot-every would be taken): they change no bit, and
    # cost time and the run's test images.
    flags = ["--resume", start, "--output-dir", replay_dir, "--stop-at-step", to_step,
             "--save-every", to_step, "--train-data", csv, "--accum-steps", split_here[1],
             "--zeroshot-every", 0]
    if root:
        flags += ["--image-root", root]
    output = os.path.join(os.path.dirname(replay_dir), "replay.out")
    status = launch(flags, split_here[0], threads, output)
    if status != 0:
        lines = open(output).read().strip().splitlines() or ["no output"]
        errors = [line for line in lines if line.startswith("error: ")]
        raise UsageError(f"the replay of {run_dir} failed (train.py exit status {status}): "
                         f"{(errors or lines)[-1].removeprefix('error: ')}")
    return compare_runs.read_checkpoint(os.path.join(replay_dir, "checkpoints",
                                                     f"step_{to_step}.pt"))


def report(run_dir, interval, reference, replayed, replay_dir, causes):
    """Print what the replay found; 0 for bit-identical here, 1 for differs."""
    from_step, to_step = interval
    count, differing = compare_runs.compare_checkpoints(reference, replayed)
    lines = compare_runs.describe_tensors(count, differing)
    there = compare_runs.read_log(run_dir)
    here = compare_runs.read_log(replay_dir)
    steps = sorted(s for s in there.keys() & here.keys() if from_step < s <= to_step)
    found = compare_runs.first_log_difference(there, here, steps, LOGGED)
    if not steps:
        lines.append("log: no step of the interval logged in both")
    elif found:
        step, field, value_there, value_here = found
        lines.append(f"log: the first differing step is {step}: {field} {value_there!r} there, "
                     f"{value_here!r} here")
    else:
        lines.append(f"log: steps {steps[0]}..{steps[-1]} ({len(steps)} logged; "
                     f"{', '.join(LOGGED)}): bit-identical")
    identical = not differing and not found
    if causes:
        order = ", the likeliest cause first"
        if identical:
            order = " (the bits agree nonetheless)"
        lines.append(f"recorded facts that differ here{order}:")
        lines += [f"  {cause}" for cause in causes]
    else:
        lines.append("recorded facts that differ here: none")
    print("\n".join(lines))
    print("bit-identical here" if identical else "differs")
    return 0 if identical else 1


def verify_run(run_dir, from_step=None, to_step=None, nproc=None, train_data=None,
               image_root=None):
    """`verify.py RUN`: replay an interval of RUN here and compare; 0 for bit-identical here, 1
    for differs. Bad input raises UsageError before anything runs; RUN is only read."""
    manifest = compare_runs.read_manifest(run_dir)
    from_step, to_step = choose_interval(run_dir, from_step, to_step)
    entries = compare_runs.invocations(manifest, from_step, to_step)
    temp = tempfile.mkdtemp(prefix="verify-")
    try:
        replay_dir, start, reference_path = stage(run_dir, from_step, to_step, temp)
        folder = os.path.join(run_dir, "checkpoints")  # the names errors give
        args = compare_runs.read_checkpoint(start, f"{folder}/step_{from_step}.pt").get("args")
        reference = compare_runs.read_checkpoint(reference_path, f"{folder}/step_{to_step}.pt")
        args = args or manifest["args"]
        data = where_the_data_is(run_dir, manifest, args, train_data, image_root)
        processes, accum = replay_split(manifest, args, entries, nproc)
        threads = entries[-1].get("device", {}).get("torch_threads") or 1
        trained = compare_runs.recorded_facts(manifest, entries)[compare_runs.SPLIT]
        print(f"verify {run_dir}: steps {from_step} -> {to_step}, trained as {trained} "
              f"(processes x batch x accumulation); replayed as {processes} x "
              f"{args['batch_size']} x {accum}, {threads} thread(s) per process")
        recorded_sha = manifest.get("train_data", {}).get("sha256")
        sha = file_sha256(data[0])
        if sha != recorded_sha:  # other rows would train: nothing to replay
            print(f"training data (CSV sha256): {recorded_sha!r} there, {sha!r} here "
                  f"({data[0]}): other rows train, so the run cannot be replayed here\ndiffers")
            return 1
        started = time.time()
        replayed = replay(run_dir, start, replay_dir, to_step, data, (processes, accum), threads)
        print(f"replayed in {time.time() - started:.1f} s")
        here = compare_runs.read_manifest(replay_dir)
        splits = [compare_runs.split(e) for e in entries + here["history"]]
        causes = compare_runs.likeliest_causes(
            compare_runs.recorded_facts(manifest, entries),
            compare_runs.recorded_facts(here, here["history"]), args, splits)
        return report(run_dir, (from_step, to_step), reference, replayed, replay_dir, causes)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
