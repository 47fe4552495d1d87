"""The study's grid (grid.py): flag values x seeds as one line of train.py flags per run, run
here one after another (finished runs skipped, a killed one resumed) or as a SLURM job array
whose every index trains its own line; and the curves of the runs' logs.

    python -m pytest -q tests/test_grid.py
"""
import json
import os
import shlex
import signal
import stat
import subprocess
import sys

import pytest

import grid
from conftest import REPO, wait_until
from support import curves
from support.errors import UsageError


def write(tmp_path, *argv):
    grid.main(["write", str(tmp_path / "study"), *argv])
    return tmp_path / "study" / "runs.txt", tmp_path / "study" / "slurm.sh"


def test_a_grid_is_one_line_per_run_with_a_folder_named_by_its_values(tmp_path):
    runs, _ = write(tmp_path, "--vary", "rrc-scale=0.7,0.8", "--vary", "lr=5e-4,1e-4",
                    "--seeds", "0", "1", "2", "--", "--max-steps", "4", "--model", "tiny")
    lines = [shlex.split(line) for line in open(runs)]
    assert len(lines) == 2 * 2 * 3
    first = lines[0]
    assert first[:6] == ["--rrc-scale", "0.7", "--lr", "5e-4", "--seed", "0"]
    assert first[first.index("--output-dir") + 1] == str(
        tmp_path / "study" / "rrc-scale_0.7__lr_5e-4__seed_0")
    assert first[-6:] == ["--resume", "auto", "--max-steps", "4", "--model", "tiny"]
    folders = {line[line.index("--output-dir") + 1] for line in lines}
    assert len(folders) == 12  # every run its own folder
    again, _ = write(tmp_path, "--vary", "rrc-scale=0.7,0.8", "--vary", "lr=5e-4,1e-4",
                     "--seeds", "0", "1", "2", "--", "--max-steps", "4", "--model", "tiny")
    assert open(again).read() == "\n".join(shlex.join(line) for line in lines) + "\n"
    with pytest.raises(UsageError, match="expected FLAG=V1,V2"):
        grid.main(["write", str(tmp_path / "x"), "--vary", "rrc-scale"])


def test_each_slurm_array_index_trains_its_own_line(tmp_path):
    """No SLURM here: srun, scontrol and torchrun are stand-ins that record what they were
    asked to run; each array index must launch the multi-node torchrun on its line."""
    runs, slurm = write(tmp_path, "--vary", "rrc-scale=0.7,0.8", "--seeds", "0", "1",
                        "--gpus-per-node", "4", "--", "--train-data", "/data/a b.csv")
    text = slurm.read_text()
    assert "#SBATCH --array=0-3\n" in text and "#SBATCH --gpus-per-node=4\n" in text
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stand_ins = {"srun": 'exec "$@"', "scontrol": "echo node7; echo node8",
                 "torchrun": 'printf "%s\\n" "$@" > "$RECORD"'}
    for name, body in stand_ins.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/bash\n{body}\n")
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    lines = [shlex.split(line) for line in open(runs)]
    for index, line in enumerate(lines):
        record = tmp_path / f"task{index}.txt"
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORD": str(record),
               "SLURM_ARRAY_TASK_ID": str(index), "SLURM_NNODES": "2",
               "SLURM_JOB_NODELIST": "node[7-8]", "SLURM_JOB_ID": "42"}
        subprocess.run(["bash", str(slurm)], env=env, check=True)
        launched = record.read_text().splitlines()
        assert launched[:5] == ["--nnodes=2", "--nproc_per_node=4", "--rdzv_backend=c10d",
                                "--rdzv_endpoint=node7:29500", f"--rdzv_id=42-{index}"]
        assert launched[5] == "train.py" and launched[6:] == line  # quoting kept: 'a b.csv'


def grid_run(runs, **popen):
    return subprocess.Popen([sys.executable, os.path.join(REPO, "grid.py"), "run", str(runs)],
                            cwd=REPO, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            **popen)


@pytest.mark.slow
def test_the_grid_runs_here_after_a_kill_and_feeds_the_study(small_csv, demo_csv, tmp_path):
    """A 2 x 2 grid (two crop scales x two seeds) of short demo runs, killed during its second
    run and started again: the first is skipped, the second resumes, all four finish; then
    evaluate.py --runs pools them into two configurations, and their curves are drawn."""
    common = ["--train-data", str(small_csv), "--image-root", os.path.dirname(demo_csv),
              "--batch-size", "8", "--max-steps", "20", "--save-every", "4", "--log-every",
              "4", "--workers", "0", "--zeroshot-every", "20"]
    runs, _ = write(tmp_path, "--vary", "rrc-scale=0.7,0.8", "--seeds", "0", "1", "--", *common)
    folders = [line[line.index("--output-dir") + 1] for line in map(shlex.split, open(runs))]
    first = grid_run(runs, start_new_session=True, stdout=subprocess.DEVNULL)
    second_checkpoint = os.path.join(folders[1], "checkpoints", "step_4.pt")
    wait_until(lambda: os.path.exists(second_checkpoint), 300, "the second run's checkpoint")
    os.killpg(first.pid, signal.SIGKILL)  # the runner and the run it started
    first.wait()
    again = grid_run(runs, stdout=subprocess.PIPE)
    output, _ = again.communicate(timeout=600)
    assert again.returncode == 0, output[-3000:]
    assert f"[1/4] {folders[0]}: finished, skipped" in output
    for folder in folders:
        with open(os.path.join(folder, "manifest.json")) as f:
            manifest = json.load(f)
        assert manifest["final_weights_sha256"]
    with open(os.path.join(folders[1], "manifest.json")) as f:
        history = json.load(f)["history"]
    assert len(history) == 2 and history[1]["from_step"] >= 4  # resumed, not restarted
    study = subprocess.run([sys.executable, "evaluate.py", "--runs", *folders, "--output",
                            str(tmp_path / "results.json")], cwd=REPO, capture_output=True,
                           text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert study.returncode == 0, study.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    labels = sorted(c["label"] for c in results["configurations"])
    assert labels == ["rrc_scale=0.7", "rrc_scale=0.8"]
    figure = curves.draw_curves(folders, tmp_path / "curves.png")
    titles = [ax.get_title() for ax in figure.axes if ax.get_visible()]
    assert titles[:3] == ["training loss", "learning rate", "temperature exp(logit_scale)"]
    assert "zero-shot lc25000_colon accuracy" in titles
    legend = [text.get_text() for text in figure.legends[0].get_texts()]
    assert legend == ["rrc_scale=0.7 (2 seeds)", "rrc_scale=0.8 (2 seeds)"]
