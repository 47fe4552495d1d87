"""A resume continues the same run or is refused: the step in a checkpoint means something only
under the global batch, data, split and schedule that wrote it (RULE 8), and the flags come from
the checkpoint, a result-changing one given otherwise being refused. The number of processes may
change as long as the global batch does not (RULE 3). One job holds a run folder at a time."""
import argparse
import json
import os
import random
import shutil
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import train
from conftest import (finish_train, run_train, small_run, start_small_run, wait_until)
from support import run_folder, train_flags
from support.errors import UsageError
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
    # The manifest keeps the first invocation's record and appends the resume to its history.
    first, second = history(stopped)
    assert first == history(tmp_path / "2x8")[0] and first["world_size"] == 2
    assert (second["world_size"], second["accum_steps"], second["from_step"]) == (1, 2, 3)
    # Another global batch from the same checkpoint is refused, in one line, before any step.
    os.remove(stopped / "checkpoints" / "step_6.pt")
    refused = run_train("--output-dir", stopped, "--accum-steps", 4, "--resume", "auto",
                        check=False)
    assert refused.returncode == 2, refused.stderr[-2000:]
    last_line = refused.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: --resume ")
    assert "global batch 16 there, 32 here" in last_line
    assert len(history(stopped)) == 2
    assert torch.load(stopped / "checkpoints" / "step_3.pt", weights_only=True)["step"] == 3


# ----------------------------------------------------------------------------- the recorded run

def test_every_flag_is_in_exactly_one_resume_list():
    """A new flag of train.py must be placed: taken from the checkpoint and refused when given
    otherwise, or free to change because it cannot change the bits (RULES.md, 8)."""
    flags = {action.dest for action in train_flags.make_parser()._actions if action.dest != "help"}
    may_change = set(train_flags.MAY_CHANGE_ON_RESUME)
    must_match = set(train_flags.MUST_MATCH_ON_RESUME)
    assert not may_change & must_match, f"in both lists: {may_change & must_match}"
    assert flags == may_change | must_match, (
        f"in neither list: {flags - may_change - must_match}; "
        f"in a list but no flag: {(may_change | must_match) - flags}")


def another_value(name, recorded):
    """The command-line words that give flag `name` another value than `recorded`, the default
    or the value a run resolved it to, and any flags it needs beside it."""
    action = {a.dest: a for a in train_flags.make_parser()._actions}[name]
    flag = action.option_strings[0]
    needs = {"activation": ["--pretrained", "weights.pt"]}.get(name, [])
    if isinstance(action, argparse.BooleanOptionalAction):
        return [f"--no-{flag[2:]}" if action.default else flag, *needs]
    if action.nargs == 0:  # store_true
        return [flag, *needs]
    if action.choices:
        return [flag, next(c for c in action.choices if c != recorded), *needs]
    if action.nargs == 2:
        return [flag, *[str(value / 2) for value in action.default], *needs]
    if action.type in (int, float) and action.default is not None:
        value = action.default + 1 if action.type is int else action.default / 2
        return [flag, str(value), *needs]
    if action.type in (int, float):
        return [flag, "3", *needs]
    return [flag, "other", *needs]


@pytest.mark.parametrize("name", train_flags.MUST_MATCH_ON_RESUME)
def test_a_resume_given_another_value_of_a_result_changing_flag_is_refused(name, tmp_path):
    """Against a checkpoint that records the defaults (as fp32, with weights.pt where a flag
    needs --pretrained), before anything is built or written."""
    recorded = vars(train.parse_args(["--output-dir", str(tmp_path)]))
    recorded.update(precision="fp32", pretrained=None)
    words = another_value(name, recorded[name])
    if "--pretrained" in words and name != "pretrained":
        recorded["pretrained"] = "weights.pt"
    checkpoint = tmp_path / "step_3.pt"
    torch.save({"args": recorded, "step": 3}, checkpoint)
    with pytest.raises(UsageError) as error:
        train.main(["--resume", str(checkpoint), *words])
    message = str(error.value)
    flag = train_flags.flag_name(name)
    assert message.startswith(f"--resume {checkpoint}: {flag} {recorded[name]!r} there, ")
    assert "would change the result" in message and "\n" not in message
    assert sorted(os.listdir(tmp_path)) == ["step_3.pt"]  # nothing written


def test_a_resume_of_a_run_stopped_with_stop_at_step_goes_on_past_it():
    """--stop-at-step ends one invocation: the resume does not take it from the checkpoint."""
    recorded = vars(train.parse_args(["--stop-at-step", "3", "--seed", "2"]))
    args = train_flags.continue_recorded_run(train.parse_args([]), set(), recorded, "step_3.pt")
    assert args.stop_at_step is None and args.seed == 2
    given = train.parse_args(["--stop-at-step", "5"])
    args = train_flags.continue_recorded_run(given, {"stop_at_step"}, recorded, "step_3.pt")
    assert args.stop_at_step == 5


def test_a_resume_records_the_dist_timeout_it_waits_for_not_the_checkpoints():
    """The process group's timeout is set before the checkpoint is read: a resume without
    --dist-timeout waits the default, and its args (its checkpoints' record) must say so."""
    recorded = vars(train.parse_args(["--dist-timeout", "240"]))
    args = train_flags.continue_recorded_run(train.parse_args([]), set(), recorded, "step_3.pt")
    assert args.dist_timeout == 60


def test_a_run_killed_after_its_last_checkpoint_resumes_to_finish_its_manifest():
    """Killed between the last checkpoint and the manifest's final weights (the demo's scores
    or the last zero-shot run there), `--resume auto` trains no step and finishes, so that
    grid.py can see it finished; a --stop-at-step behind the run's step is refused."""
    schedule = train.Schedule(global_batch=16, steps_per_epoch=3, total_steps=6, warmup=2,
                              save_every=3)
    assert train.last_step(train.parse_args([]), schedule, 6) == 6
    assert train.last_step(train.parse_args(["--stop-at-step", "4"]), schedule, 6) == 6
    assert train.last_step(train.parse_args(["--stop-at-step", "4"]), schedule, 3) == 4
    with pytest.raises(UsageError, match="--stop-at-step 3: this run is at step 3 already"):
        train.last_step(train.parse_args(["--stop-at-step", "3"]), schedule, 3)


def test_a_checkpoint_path_alone_continues_the_run_folder_it_lies_in(tmp_path):
    """A moved or copied run, or a relative --output-dir recorded in another working folder:
    `--resume RUN/checkpoints/step_N.pt` continues RUN, wherever it is now."""
    recorded = vars(train.parse_args(["--output-dir", "runs/elsewhere", "--wd", "0.1"]))
    checkpoint = tmp_path / "moved" / "checkpoints" / "step_3.pt"
    given = train_flags.given_flags(["--resume", str(checkpoint)])
    args = train.parse_args(["--resume", str(checkpoint)])
    args = train_flags.continue_recorded_run(args, given, recorded, str(checkpoint))
    assert args.output_dir == str(tmp_path / "moved") and args.wd == 0.1
    given = train_flags.given_flags(["--resume", str(checkpoint), "--output-dir", "fork"])
    args = train.parse_args(["--resume", str(checkpoint), "--output-dir", "fork"])
    args = train_flags.continue_recorded_run(args, given, recorded, str(checkpoint))
    assert args.output_dir == "fork"  # given: a new folder that continues from there


def test_a_shortened_flag_is_an_error_not_the_flag_it_prefixes(capsys):
    for shortened in (["--max-step", "2"], ["--run", "x"]):
        with pytest.raises(SystemExit) as exit:
            train.parse_args(shortened)
        assert exit.value.code == 2
        assert "unrecognized arguments" in capsys.readouterr().err


def history(run_dir):
    with open(os.path.join(run_dir, "manifest.json")) as f:
        return json.load(f)["history"]


@pytest.mark.slow
def test_resume_auto_with_the_run_folder_alone_continues_the_recorded_run(
        small_csv, demo_csv, tmp_path):
    """A run with flags other than the defaults, stopped after step 3 and continued by
    `--resume auto --output-dir RUN` alone: the uninterrupted run's bits, the first invocation's
    record intact in the manifest and the resume appended to its history."""
    flags = [*FP32, "--batch-size", 8, "--wd", 0.05, "--rrc-scale", 0.7, "--seed", 3]
    whole = small_run(small_csv, demo_csv, tmp_path / "whole", *flags)
    stopped = tmp_path / "stopped"
    shutil.copytree(tmp_path / "whole", stopped)
    for name in ("step_6.pt", "latest.pt"):
        os.remove(stopped / "checkpoints" / name)
    first = history(stopped)[0]
    run_train("--resume", "auto", "--output-dir", stopped)
    resumed = torch.load(stopped / "checkpoints" / "latest.pt", weights_only=True)
    different = [name for name in whole["model"]
                 if not torch.equal(resumed["model"][name], whole["model"][name])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    assert resumed["args"]["wd"] == 0.05 and resumed["args"]["seed"] == 3
    entries = history(stopped)
    assert len(entries) == 2 and entries[0] == first
    assert entries[1]["from_step"] == 3 and entries[1]["to_step"] == 6
    # Given again with its recorded value, a flag is fine; with another, refused.
    refused = run_train("--resume", "auto", "--output-dir", stopped, "--seed", 3, "--wd", 0.2,
                        check=False)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].startswith(
        f"error: --resume {stopped / 'checkpoints' / 'step_6.pt'}: --wd 0.05 there, 0.2 here")
    assert len(history(stopped)) == 2


@pytest.mark.slow
def test_a_second_job_on_a_live_run_folder_is_refused_and_a_resume_after_kill_is_not(
        small_csv, demo_csv, tmp_path):
    """One job per run folder: a second one is refused within seconds, naming the holder, while
    the first trains on untouched; after kill -9 of every process of a job, --resume auto goes on
    (the lock died with its holder)."""
    run_dir = tmp_path / "run"
    long_run = ["--batch-size", 8, "--max-steps", 40, "--save-every", 5, "--log-every", 1]
    first, _ = start_small_run(small_csv, demo_csv, run_dir, *long_run, nproc=2)
    log = run_dir / "log.jsonl"
    wait_until(log.exists, 120, "the first job's first log line")
    started = time.monotonic()
    second = run_train("--resume", "auto", "--output-dir", run_dir, check=False)
    assert time.monotonic() - started < 30
    assert second.returncode == 2
    message = second.stderr.strip().splitlines()[-1]
    assert message.startswith(f"error: {run_dir} is held by pid ") and "One job per" in message
    finish_train(first)
    steps = [json.loads(line)["step"] for line in open(log)]
    assert steps == list(range(1, 41))  # each step once: nobody else wrote
    assert len(history(run_dir)) == 1
    # kill -9 of every process, then a resume: accepted, and the run completes.
    killed = tmp_path / "killed"
    job, _ = start_small_run(small_csv, demo_csv, killed, *long_run, nproc=2)
    wait_until(lambda: (killed / "checkpoints" / "step_5.pt").exists(), 120, "a checkpoint")
    job.kill()
    run_train("--resume", "auto", "--output-dir", killed, nproc=2)
    done = torch.load(killed / "checkpoints" / "latest.pt", weights_only=True)
    assert done["step"] == 40


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


def test_a_manifest_of_an_older_version_gets_a_history_on_resume(tmp_path):
    """A run folder written before manifests had a history: its record stays, and the resume
    starts the history, instead of failing at its first key."""
    from types import SimpleNamespace
    from support import manifest
    old = {"args": {"seed": 0}, "versions": {}, "git": {}, "device": {}, "total_steps": 6}
    (tmp_path / "manifest.json").write_text(json.dumps(old))
    args = SimpleNamespace(batch_size=8, accum_steps=1)
    proc = SimpleNamespace(world=1, device=torch.device("cpu"))
    written = manifest.write_manifest(args, tmp_path, proc, None, None, None, None, 3, {})
    assert written["args"] == {"seed": 0}
    assert [entry["from_step"] for entry in written["history"]] == [3]
    assert json.loads((tmp_path / "manifest.json").read_text()) == written
