"""A study's grid as plain text: flag values x seeds expanded into one line of train.py flags per
run, each with its own run folder named from its values; the lines run one after another here, or
as a SLURM job array on a cluster. No scheduler of our own: the list is the plan, and the run
folders are the state (a finished run has its final weights in its manifest; any other resumes
with --resume auto, which every line carries)."""
import itertools
import json
import os
import shlex
import subprocess

from support.errors import UsageError
from support.machine import REPO_DIR, train_command

RUNS_FILE = "runs.txt"
SLURM_FILE = "slurm.sh"


def parse_vary(text):
    """'rrc-scale=0.7,0.8' -> ('--rrc-scale', ['0.7', '0.8']): the argparse type of --vary."""
    name, sep, values = text.partition("=")
    if not sep or not name or not values:
        raise UsageError(f"--vary {text}: expected FLAG=V1,V2,..., e.g. rrc-scale=0.7,0.8")
    return "--" + name.removeprefix("--"), values.split(",")


def run_name(choices):
    """The run folder's name for [(flag, value), ...]: 'rrc-scale_0.7__seed_0'. Fixed by the
    values alone, so that the same grid always names the same folders."""
    return "__".join(f"{flag.removeprefix('--')}_{value}" for flag, value in choices)


def expand(varied, seeds, out_dir, common):
    """One line of train.py flags per point of the grid (every combination of the varied
    values) and seed, in a fixed order: the varied flags first, then the seed."""
    lines = []
    flags = [flag for flag, _ in varied]
    for values in itertools.product(*[values for _, values in varied]):
        for seed in seeds:
            choices = [*zip(flags, values), ("--seed", str(seed))]
            words = [word for choice in choices for word in choice]
            # Absolute: the lines run from any folder, and slurm.sh runs them from the repository.
            folder = os.path.join(os.path.abspath(out_dir), run_name(choices))
            words += ["--output-dir", folder, "--resume", "auto", *common]
            lines.append(shlex.join(words))
    return lines


SLURM_TEMPLATE = """#!/bin/bash
# One array task per line of {runs}: task i trains line i + 1 with torchrun on
# --nodes nodes of {gpus} GPUs (the README's multi-node command, c10d rendezvous). A task that
# is cut short (time limit, preemption) resumes where it stopped when resubmitted: each line
# carries --resume auto. Finished runs can be left out with --array.
#SBATCH --job-name={name}
#SBATCH --array=0-{last}
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={gpus}
#SBATCH --cpus-per-task={cpus}
set -euo pipefail
cd {repo}
LINE=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {runs})
MASTER_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)  # all read: no SIGPIPE
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
eval "srun torchrun --nnodes=$SLURM_NNODES --nproc_per_node={gpus} \\
    --rdzv_backend=c10d --rdzv_endpoint=$MASTER_HOST:29500 \\
    --rdzv_id=$SLURM_JOB_ID-$SLURM_ARRAY_TASK_ID train.py $LINE"
"""


def write_grid(out_dir, varied, seeds, common, gpus=8, cpus_per_gpu=8):
    """OUT_DIR/runs.txt (a line per run) and OUT_DIR/slurm.sh (its job array); their paths."""
    if not varied and len(seeds) < 2:
        raise UsageError("a grid needs a --vary FLAG=V1,V2 or at least two --seeds.")
    lines = expand(varied, seeds, out_dir, common)
    os.makedirs(out_dir, exist_ok=True)
    runs = os.path.abspath(os.path.join(out_dir, RUNS_FILE))
    with open(runs, "w") as f:
        f.write("\n".join(lines) + "\n")
    script = SLURM_TEMPLATE.format(runs=shlex.quote(runs), name=os.path.basename(out_dir),
                                   last=len(lines) - 1, gpus=gpus, cpus=gpus * cpus_per_gpu,
                                   repo=shlex.quote(REPO_DIR))
    slurm = os.path.join(out_dir, SLURM_FILE)
    with open(slurm, "w") as f:
        f.write(script)
    return runs, slurm


def read_lines(runs):
    """The lines of a runs.txt, each as its list of words."""
    if not os.path.isfile(runs):
        raise UsageError(f"{runs}: no such file; write one with `python grid.py write`.")
    with open(runs) as f:
        return [shlex.split(line) for line in f if line.strip()]


def output_dir(words):
    return words[words.index("--output-dir") + 1]


def finished(run_dir):
    """Whether the run in `run_dir` trained to its end (its manifest holds the final weights)."""
    manifest = os.path.join(run_dir, "manifest.json")
    if not os.path.isfile(manifest):
        return False
    with open(manifest) as f:
        return "final_weights_sha256" in json.load(f)


def run_locally(runs, nproc):
    """Every line of `runs`, one after another: finished runs skipped, the others started or
    resumed. Stops at the first run that fails, naming it; a rerun goes on from there."""
    lines = read_lines(runs)
    for number, words in enumerate(lines, start=1):
        run_dir = output_dir(words)
        if finished(run_dir):
            print(f"[{number}/{len(lines)}] {run_dir}: finished, skipped", flush=True)
            continue
        print(f"[{number}/{len(lines)}] {run_dir}: training", flush=True)
        status = subprocess.run([*train_command(nproc), *words]).returncode
        if status != 0:
            raise UsageError(f"{runs}: line {number} ({run_dir}) failed with exit status "
                             f"{status}. Fix it and rerun: finished runs are skipped, this one "
                             "resumes.")
    print(f"{len(lines)} runs finished. The study: python evaluate.py --runs "
          f"{os.path.join(os.path.dirname(output_dir(lines[0])), '*')}")
