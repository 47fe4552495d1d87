"""A resume continues the same run or is refused: the step in a checkpoint means something only
under the global batch, data, split and schedule that wrote it (RULE 8). The number of processes
may change as long as the global batch does not (RULE 3)."""
import os
import random
import shutil

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import train
from conftest import run_train, small_run
from support.errors import UsageError
from support import run_folder
from support.distributed import Process

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
    assert len(whole["rng"]) == 2 and len(resumed["rng"]) == 1  # each rank's random states
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


def draws():
    """A number from each generator a run seeds (RULE 1)."""
    return [torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)]]


def resume_random_states(rank, world, rendezvous, results):
    """One rank: draw from generators seeded apart, save every rank's states as a checkpoint
    does, draw on, then restore, on this number of processes and on one, and draw again."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=world)
    torch.manual_seed(10 + rank)
    np.random.seed(10 + rank)
    random.seed(10 + rank)
    saved = run_folder.rng_states_of_every_rank()
    expected = draws()
    run_folder.set_rng_states(saved, Process(rank, world, torch.device("cpu")))
    resumed = draws()
    run_folder.set_rng_states(saved, Process(0, 1, torch.device("cpu")))  # on 1 process
    on_one_process = draws()
    everybody = [None] * world
    dist.all_gather_object(everybody, (len(saved), expected, resumed, on_one_process))
    if rank == 0:
        torch.save(everybody, results)
    dist.destroy_process_group()


@pytest.mark.slow
def test_each_rank_resumes_its_own_random_states(tmp_path):
    """2 gloo ranks whose generators differ: each draws after a resume what it drew before;
    resumed on 1 process, the one rank draws rank 0's numbers, as the note it prints says."""
    world = 2
    results = tmp_path / "results.pt"
    mp.start_processes(resume_random_states, args=(world, str(tmp_path / "rendezvous"),
                                                   str(results)),
                       nprocs=world, start_method="fork")
    everybody = torch.load(results, weights_only=False)
    rank0_expected = everybody[0][1]
    for saved_count, expected, resumed, on_one_process in everybody:
        assert saved_count == world
        for before, after, alone, rank0 in zip(expected, resumed, on_one_process, rank0_expected):
            assert np.array_equal(np.asarray(before), np.asarray(after))
            assert np.array_equal(np.asarray(alone), np.asarray(rank0))
    assert not np.array_equal(np.asarray(everybody[1][1][0]), np.asarray(rank0_expected[0]))
