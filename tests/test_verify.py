"""verify.py: a run's saved interval replayed here comes out bit-identical where RULE 3 says so,
and one ulp off is found and named; two runs are explained as the same bits, the same
configuration but other bits (with the likeliest cause), or another configuration; bad input is
one line and exit status 2, and nothing is ever written into the run folder checked.

    python -m pytest -q tests/test_verify.py            # the slow ones train and replay
"""
import csv
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import verify
from conftest import REPO, run_train, small_run
from support import compare_runs, replay, train_flags
from support.errors import UsageError, run_main
from support.files import images_fingerprint

# Checkpoints at steps 2 and 4, every step logged, fp32 on every machine.
STEPS = ["--batch-size", 8, "--max-steps", 4, "--save-every", 2, "--log-every", 1,
         "--precision", "fp32", "--lr", "1e-3", "--warmup", 1]


def snapshot(folder):
    """{relative path: (size, mtime)} of every file under `folder`: what 'nothing written'
    compares."""
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            found[os.path.relpath(path, folder)] = (os.path.getsize(path),
                                                    os.stat(path).st_mtime_ns)
    return found


def run_verify(capsys, *argv):
    """verify.py in this process (its replay is a process of its own): (exit status, output)."""
    status = verify.main([str(a) for a in argv])
    return status, capsys.readouterr().out


@pytest.fixture(scope="module")
def run_2x8(small_csv, demo_csv, tmp_path_factory):
    """2 processes x 8 for 4 steps (checkpoints 2 and 4), one thread per process."""
    run_dir = tmp_path_factory.mktemp("run_2x8")
    small_run(small_csv, demo_csv, run_dir, *STEPS, nproc=2)
    return run_dir


@pytest.mark.slow
def test_a_run_verified_on_its_own_number_of_processes_is_bit_identical_here(run_2x8):
    """`python verify.py RUN`, as users type it: torchrun on the recorded 2 processes."""
    before = snapshot(run_2x8)
    result = subprocess.run([sys.executable, os.path.join(REPO, "verify.py"), str(run_2x8)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == "bit-identical here"
    assert "steps 2 -> 4" in lines[0] and "replayed as 2 x 8 x 1" in lines[0]
    assert "log: steps 3..4 (2 logged; loss, lr, logit_scale): bit-identical" in lines
    assert snapshot(run_2x8) == before  # nothing written into the run folder


@pytest.mark.slow
def test_a_run_of_2_x_8_verified_as_1_x_8_x_2_is_bit_identical(run_2x8, capsys):
    """RULE 3's promise, checked by the user's command: the recorded guarantee is bitwise."""
    guarantee = json.load(open(run_2x8 / "manifest.json"))["world_size_guarantee"]
    assert guarantee["level"] == "bitwise"
    status, out = run_verify(capsys, run_2x8, "--nproc", 1)
    assert status == 0, out
    assert "replayed as 1 x 8 x 2" in out and out.strip().endswith("bit-identical here")


@pytest.mark.slow
def test_one_ulp_off_in_the_later_checkpoint_differs_naming_the_tensor(run_2x8, tmp_path,
                                                                         capsys):
    copy = tmp_path / "run"
    shutil.copytree(run_2x8, copy)
    path = copy / "checkpoints" / "step_4.pt"
    checkpoint = torch.load(path, weights_only=True)
    weight = checkpoint["model"]["visual.proj"]
    weight.view(-1)[0] = torch.nextafter(weight.view(-1)[0], torch.tensor(float("inf")))
    torch.save(checkpoint, path)
    status, out = run_verify(capsys, copy, "--nproc", 1)
    assert status == 1, out
    assert "1 of 440 tensors differ" in out and "  visual.proj: " in out
    assert out.strip().endswith("differs")


@pytest.mark.slow
def test_a_recorded_library_version_or_device_that_differs_here_is_named(run_2x8, tmp_path,
                                                                         capsys):
    copy = tmp_path / "run"
    shutil.copytree(run_2x8, copy)
    manifest = json.load(open(copy / "manifest.json"))
    manifest["history"][-1]["versions"]["torch"] = "2.0.0"
    manifest["history"][-1]["device"]["gpus"] = ["NVIDIA A100-SXM4-80GB"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    status, out = run_verify(capsys, copy, "--nproc", 1)
    assert status == 0, out  # the bits agree; the facts are named all the same
    facts = out.split("recorded facts that differ here")[1].splitlines()
    assert facts[1].startswith("  versions.torch: '2.0.0' there, ")
    assert "expected to give other bits" in facts[1]
    assert any(line.startswith("  device and its model: ") and "A100" in line for line in facts)


@pytest.mark.slow
def test_an_image_changed_after_training_is_named_by_its_fingerprint(small_csv, demo_csv,
                                                                    tmp_path, capsys):
    """A private copy of the 48 images, one of them replaced by another after training."""
    images = tmp_path / "images"
    with open(small_csv, newline="") as f:
        paths = [row["image_path"] for row in csv.DictReader(f)]
    for path in paths:
        os.makedirs(images / os.path.dirname(path), exist_ok=True)
        shutil.copy(os.path.join(os.path.dirname(demo_csv), path), images / path)
    run_dir = tmp_path / "run"
    run_train("--train-data", small_csv, "--image-root", images, "--output-dir", run_dir,
              "--workers", 0, *STEPS)
    shutil.copy(images / paths[1], images / paths[0])
    status, out = run_verify(capsys, run_dir)
    assert status in (0, 1), out  # whether the bits change depends on the batches replayed
    assert "  image files (fingerprint): " in out


@pytest.mark.slow
def test_two_runs_are_the_same_bits_or_another_configuration_naming_the_flag(
        run_2x8, small_csv, demo_csv, tmp_path_factory, capsys):
    again = tmp_path_factory.mktemp("again")
    small_run(small_csv, demo_csv, again, *STEPS, nproc=2)
    status, out = run_verify(capsys, run_2x8, again)
    assert status == 0 and out.strip().endswith("verdict: the same bits"), out
    assert "checkpoint step 4: 440 tensors, bit-identical" in out
    seed_1 = tmp_path_factory.mktemp("seed_1")
    small_run(small_csv, demo_csv, seed_1, *STEPS, "--seed", 1, nproc=2)
    status, out = run_verify(capsys, run_2x8, seed_1)
    assert status == 1
    assert out.strip().endswith("verdict: another configuration: --seed 0 and 1"), out
    assert "  args.seed " in out


@pytest.mark.slow
def test_3_x_8_and_1_x_8_x_3_are_the_same_configuration_but_other_bits_by_their_split(
        small_csv, demo_csv, tmp_path, capsys):
    """RULE 3 promises no bits for 3 processes: the split is the likeliest cause."""
    small_run(small_csv, demo_csv, tmp_path / "3x8", *STEPS, nproc=3)
    small_run(small_csv, demo_csv, tmp_path / "1x8x3", *STEPS, "--accum-steps", 3)
    status, out = run_verify(capsys, tmp_path / "3x8", tmp_path / "1x8x3")
    assert status == 1, out
    verdict = [line for line in out.splitlines() if line.startswith("verdict: ")]
    assert verdict == [
        "verdict: the same configuration but other bits; likeliest cause: processes x batch x "
        "accumulation: '3 x 8 x 1' there, '1 x 8 x 3' here: RULE 3 promises no bits across "
        "these splits: 3 process(es) x --accum-steps 1: not both powers of two, so sums and "
        "divisions round differently"]
    assert "losses: 4 common logged steps; the first that differs is step " in out


# ----------------------------------------------------------------------------- quick: no training

def fake_run(folder, steps=(2, 4), history=True, csv_path="/nowhere/pairs.csv"):
    """A run folder of train.py's shape with tiny checkpoints: enough for the checks that come
    before any replay."""
    args = {"batch_size": 8, "train_data": csv_path, "image_root": None}
    manifest = {"args": args, "global_batch_size": 8,
                "train_data": {"path": csv_path, "sha256": "0" * 64}}
    if history:
        manifest["history"] = [{"world_size": 1, "batch_size": 8, "accum_steps": 1,
                                "from_step": 0}]
    os.makedirs(folder / "checkpoints")
    os.makedirs(folder / "tokenizer")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    for step in steps:
        torch.save({"model": {}, "optimizer": {"state": {}, "param_groups": []}, "step": step,
                    "args": args}, folder / "checkpoints" / f"step_{step}.pt")
    return folder


def refused(capsys, *argv):
    """The one line verify.py prints on stderr, exiting with status 2."""
    with pytest.raises(SystemExit) as exit:
        run_main(lambda: verify.main([str(a) for a in argv]))
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    return err


def test_bad_input_is_one_line_and_exit_status_2_and_nothing_is_written(tmp_path, capsys):
    not_a_run = tmp_path / "empty"
    os.makedirs(not_a_run)
    assert "not a run folder of train.py (no manifest.json" in refused(capsys, not_a_run)
    old = fake_run(tmp_path / "old", history=False)
    assert f"{old / 'manifest.json'}: written by an older train.py" in refused(capsys, old)
    damaged = fake_run(tmp_path / "damaged")
    (damaged / "checkpoints" / "step_4.pt").write_bytes(b"PK\x03\x04 cut short")
    err = refused(capsys, damaged)
    assert err.startswith(f"error: {damaged / 'checkpoints' / 'step_4.pt'}: not a readable ")
    assert "damaged" in err
    moved = fake_run(tmp_path / "moved")
    err = refused(capsys, moved)
    assert err.startswith("error: /nowhere/pairs.csv: the training data of ")
    assert "Pass --train-data CSV" in err
    one = fake_run(tmp_path / "one", steps=(4,))
    assert "a replay needs two" in refused(capsys, one)
    assert "no step_3.pt" in refused(capsys, moved, "--from-step", 3)
    for folder in (old, damaged, moved, one):
        before = snapshot(folder)
        with pytest.raises(UsageError):
            verify.main([str(folder)])
        assert snapshot(folder) == before


def test_a_number_of_processes_that_cannot_keep_the_global_batch_is_refused(tmp_path, capsys):
    data = tmp_path / "pairs.csv"
    data.write_text("image_path,caption\n")
    run = fake_run(tmp_path / "run", csv_path=str(data))
    err = refused(capsys, run, "--nproc", 3)
    assert "--nproc 3: the recorded global batch 8" in err


def test_the_images_fingerprint_reads_all_of_a_small_set_and_a_seeded_sample_of_a_large_one(
        tmp_path):
    for i in range(6):
        (tmp_path / f"{i}.jpg").write_bytes(bytes([i]) * 10)
    paths = [f"{i}.jpg" for i in range(6)]
    whole = images_fingerprint(paths, tmp_path)
    assert (whole["files"], whole["rows"]) == (6, 6)
    sample = images_fingerprint(paths * 1000, tmp_path, sample=50)
    assert (sample["files"], sample["rows"]) == (50, 6000)
    assert sample == images_fingerprint(paths * 1000, tmp_path, sample=50)
    (tmp_path / "3.jpg").write_bytes(b"another image")
    assert images_fingerprint(paths, tmp_path)["sha256"] != whole["sha256"]
    os.remove(tmp_path / "3.jpg")  # missing: counted, not an error
    assert images_fingerprint(paths, tmp_path)["files"] == 6


def test_the_likeliest_cause_puts_data_first_and_a_promised_split_last():
    args = {"accum_steps": 1, "gather_with_grad": True, "local_loss": False,
            "deterministic": True, "compile": False}
    there = {"image files (fingerprint)": "a", "versions.torch": "2.0",
             compare_runs.SPLIT: "2 x 8 x 1"}
    here = {"image files (fingerprint)": "b", "versions.torch": "2.1",
            compare_runs.SPLIT: "1 x 8 x 2"}
    causes = compare_runs.likeliest_causes(there, here, args, [(2, 8, 1), (1, 8, 2)])
    assert [c.split(":")[0] for c in causes] == ["image files (fingerprint)", "versions.torch",
                                                 compare_runs.SPLIT]
    causes = compare_runs.likeliest_causes(there, here, args, [(3, 8, 1), (1, 8, 3)])
    assert causes[1].startswith(compare_runs.SPLIT) and "promises no bits" in causes[1]


def test_a_zero_shot_line_does_not_hide_the_training_line_of_its_step(tmp_path):
    """train.py --zeroshot-every writes a line of accuracies after the training line of the same
    step: the losses compared are the training lines', in a run with zero-shot or without."""
    training = [{"step": step, "loss": 2.0 - step / 10, "lr": 1e-3, "logit_scale": 14.3}
                for step in (1, 2)]
    zero_shot = {"step": 2, "zero_shot": {"pcam": 0.5}, "zero_shot_seconds": 0.1}
    for name, records in (("scored", [*training, zero_shot]), ("plain", training)):
        os.makedirs(tmp_path / name)
        with open(tmp_path / name / "log.jsonl", "w") as f:
            f.writelines(json.dumps(record) + "\n" for record in records)
    assert compare_runs.read_log(tmp_path / "scored")[2]["loss"] == 1.8
    line, same = compare_runs.compare_losses(tmp_path / "scored", tmp_path / "plain")
    assert same, line


def test_the_replay_gives_only_flags_a_resume_may_change_and_scores_no_zero_shot(tmp_path,
                                                                                 monkeypatch):
    """The replay resumes checkpoint A: a flag a resume refuses would stop it, and the run's
    --zeroshot-every, taken from A, would score (and need) its test images for nothing."""
    launched = []

    def no_training(flags, processes, threads, log_path):
        launched.append([str(flag) for flag in flags])
        with open(log_path, "w") as f:
            f.write("error: not trained here\n")
        return 2
    monkeypatch.setattr(replay, "launch", no_training)
    with pytest.raises(UsageError, match="not trained here"):
        replay.replay(tmp_path / "run", "step_2.pt", str(tmp_path / "replay"), 4,
                      ("pairs.csv", "images"), (1, 2), 1)
    given = train_flags.given_flags(launched[0])
    assert given <= set(train_flags.MAY_CHANGE_ON_RESUME)
    recorded = vars(train_flags.parse_args(["--zeroshot-every", "5"]))
    resumed = train_flags.continue_recorded_run(train_flags.parse_args(launched[0]), given,
                                                recorded, "step_2.pt")
    assert resumed.zeroshot_every == 0
