"""A resume continues the same run or is refused: the step in a checkpoint means something only
under the global batch, data, split and schedule that wrote it (RULE 8). The number of processes
may change as long as the global batch does not (RULE 3)."""
import os
import shutil

import pytest
import torch

import train
from conftest import run_train, small_run
from support.errors import UsageError
from support import run_folder

FP32 = ["--precision", "fp32", "--lr", "1e-3", "--warmup", 2, "--max-steps", 6, "--save-every", 3]


def identity(**changes):
    args = train.parse_args(["--train-data", "pairs.csv"])
    schedule = train.Schedule(global_batch=16, steps_per_epoch=3, total_steps=6, warmup=2,
                              save_every=3)
    data = train.TrainData(rows=[("a.jpg", "a")] * 48, samples=list(range(48)),
                           split_filter={}, sha256="0" * 64, crop_fallback=None)
    result = run_folder.run_identity(args, schedule, data)
    result.update(changes)
    return result


def test_a_checkpoint_of_the_same_run_resumes_and_of_another_is_refused_naming_both_values():
    run_folder.check_same_run({"run_identity": identity()}, identity(), "step_3.pt")
    with pytest.raises(UsageError) as error:
        run_folder.check_same_run({"run_identity": identity()},
                             identity(**{"--lr": 1e-3, "global batch": 8}), "step_3.pt")
    message = str(error.value)
    assert "step_3.pt" in message and "\n" not in message
    assert "--lr 0.0005 there, 0.001 here" in message
    assert "global batch 16 there, 8 here" in message


def test_the_identity_holds_what_fixes_order_and_schedule_but_not_the_split_of_the_batch():
    keys = set(identity())
    assert {"global batch", "--seed", "--epochs", "--max-steps", "--warmup", "--lr", "--model",
            "--train-data sha256", "--train-split", "training rows"} <= keys
    assert not keys & {"--batch-size", "--accum-steps", "world size", "--workers"}


@pytest.mark.slow
def test_resume_on_half_the_processes_with_accumulation_continues_the_same_run(
        small_csv, demo_csv, tmp_path):
    """2 processes x 8 for 6 steps, against the same run stopped at step 3 and continued as
    1 process x 8 x --accum-steps 2: the same bits (RULE 3's tree), given one thread per
    process in both."""
    whole = small_run(small_csv, demo_csv, tmp_path / "2x8", *FP32, "--batch-size", 8, nproc=2)
    stopped = tmp_path / "stopped"
    shutil.copytree(tmp_path / "2x8", stopped)
    for name in ("step_6.pt", "latest.pt"):
        os.remove(stopped / "checkpoints" / name)
    resumed = small_run(small_csv, demo_csv, stopped, *FP32, "--batch-size", 8,
                        "--accum-steps", 2, "--resume", "auto", env={"OMP_NUM_THREADS": "1"})
    assert resumed["step"] == whole["step"] == 6
    different = [name for name in whole["model"]
                 if not torch.equal(resumed["model"][name], whole["model"][name])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    # Another global batch from the same checkpoint is refused, in one line, before any step.
    os.remove(stopped / "checkpoints" / "step_6.pt")
    refused = run_train("--train-data", small_csv, "--image-root", os.path.dirname(demo_csv),
                        "--output-dir", stopped, "--workers", 0, *FP32, "--batch-size", 16,
                        "--accum-steps", 2, "--resume", "auto", check=False)
    assert refused.returncode == 2, refused.stderr[-2000:]
    last_line = refused.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: --resume ")
    assert "global batch 16 there, 32 here" in last_line
    assert torch.load(stopped / "checkpoints" / "step_3.pt", weights_only=True)["step"] == 3
