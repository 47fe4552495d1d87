"""Bad input gets one clear line naming the file, the row and the fix; faults lose nothing; loaded
files never run code. Real files in tmp_path, real processes, real kills."""
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import train
from conftest import (REPO, STEPS, finish_train, kill_job, run_train, small_run, start_train,
                      wait_for_exit, wait_until)
from support.errors import UsageError
from support import csv_table, distributed, files, run_folder


def one_line_exit(call, *args, **kwargs):
    with pytest.raises(UsageError) as error:
        call(*args, **kwargs)
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def error_line(result):
    """The one line `error: ...` that a usage error prints (on the line of the progress bar,
    where one was drawn)."""
    lines = re.findall(r"error: .*", result.stderr)
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[0]


def write_csv(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding))
    return str(path)


# ----------------------------------------------------------------------------- CSV

def test_csv_problems_are_named_with_the_fix(tmp_path):
    missing = str(tmp_path / "missing.csv")
    message = one_line_exit(data.read_csv, missing)
    assert missing in message and "no such file" in message
    empty = write_csv(tmp_path / "empty.csv", "")
    message = one_line_exit(data.read_csv, empty)
    assert empty in message and "empty" in message
    columns = write_csv(tmp_path / "cols.csv", "path,text\na.jpg,b\n")
    message = one_line_exit(data.read_csv, columns)
    assert columns in message and "no column 'image_path'" in message
    assert "['path', 'text']" in message and "--csv-img-key" in message
    semicolons = write_csv(tmp_path / "semi.csv", "image_path;caption\na.jpg;b\n")
    # One column found: the separator is the likely culprit.
    assert "--csv-separator" in one_line_exit(data.read_csv, semicolons)
    header = write_csv(tmp_path / "header.csv", "image_path,caption\n")
    message = one_line_exit(data.read_csv, header)
    assert header in message and "no rows" in message


def test_csv_quoting_bom_separator_and_duplicates(tmp_path, capsys):
    row = 'a.jpg,"tumour, grade 2\nsecond line",x\n'
    text = "image_path,caption,other\n" + row + row
    rows = data.read_csv(write_csv(tmp_path / "bom.csv", text, "utf-8-sig"))
    assert rows == [("a.jpg", "tumour, grade 2\nsecond line")] * 2
    assert "1 duplicate rows" in capsys.readouterr().out
    tsv = write_csv(tmp_path / "pairs.tsv", "filepath\ttitle\nb.jpg\tlymph node, benign\n")
    assert data.read_csv(tsv, "filepath", "title") == [("b.jpg", "lymph node, benign")]


def test_image_paths_outside_the_image_root_are_refused(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "root").mkdir()
    # A dataset folder on another disk
    (tmp_path / "root" / "slides").symlink_to(tmp_path / "elsewhere")
    root = str(tmp_path / "root")
    bad_paths = ["../../etc/passwd", "slides/../x.jpg", "slides/../../x.jpg", "..\\x.jpg",
                 "/etc/passwd"]
    for bad in bad_paths:
        rows = [("ok.jpg", "fine"), ("slides/a.jpg", "symlinked, fine"), (bad, "sneaky")]
        paths = [path for path, _ in rows]
        message = one_line_exit(csv_table.check_paths, paths, root, "pairs.csv",
                                allow_absolute=False)
        assert "pairs.csv: data row 3: " in message and repr(bad) in message
        assert "--allow-absolute-paths" in message
    csv_table.check_paths(["/abs/ok.jpg"], root, "pairs.csv", allow_absolute=True)


# ----------------------------------------------------------------------------- images

def test_every_readable_image_mode_becomes_the_right_rgb(tmp_path):
    red = np.zeros((40, 40, 3), np.uint8)
    red[..., 0] = 200
    transparent_red = np.dstack([red, np.zeros((40, 40), np.uint8)])
    cases = {
        "gray.png": (Image.fromarray(np.full((40, 40), 100, np.uint8)), (100, 100, 100)),
        "gray16.png": (Image.fromarray(np.full((40, 40), 100 * 256, np.uint16)),
                       (100, 100, 100)),
        "rgba.png": (Image.fromarray(transparent_red), (255, 255, 255)),  # transparent: white
        "palette.png": (Image.fromarray(red).convert("P"), (200, 0, 0)),
        "cmyk.jpg": (Image.fromarray(red).convert("CMYK"), (200, 0, 0)),
        "tiny.jpg": (Image.fromarray(red[:3, :3]), (200, 0, 0)),
    }
    for name, (image, expected) in cases.items():
        image.save(tmp_path / name)
        rgb = data.load_rgb(tmp_path / name)
        assert rgb.mode == "RGB"
        # JPEG and the web palette round.
        assert np.abs(np.asarray(rgb)[1, 1].astype(int) - expected).max() <= 6, name
    # A crop larger than a tiny image still works: RandomResizedCrop upsamples.
    tiny = data.load_rgb(tmp_path / "tiny.jpg")
    assert data.train_transform(tiny, 64, 0.8, seed=0).shape == (3, 64, 64)


def test_unreadable_images_are_bad_samples_with_a_reason(tmp_path):
    good = tmp_path / "good.jpg"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(good)
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    (tmp_path / "truncated.jpg").write_bytes(good.read_bytes()[:300])
    Image.fromarray(np.zeros((100, 100, 3), np.uint8)).save(tmp_path / "large.png")
    for name in ("missing.jpg", "empty.jpg", "text.jpg", "truncated.jpg"):
        with pytest.raises(data.BadSampleError, match="unreadable image"):
            data.load_sample(str(tmp_path / name), "caption", max_pixels=10**8)
    with pytest.raises(data.BadSampleError, match="max-image-pixels"):
        data.load_sample(str(tmp_path / "large.png"), "caption", max_pixels=5000)
    with pytest.raises(data.BadSampleError, match="empty caption"):
        data.load_sample(str(good), "  \t", max_pixels=10**8)


@pytest.fixture(scope="module")
def messy_csv(demo_csv, tmp_path_factory):
    """24 good demo rows and three bad ones, data rows 11-13: a truncated JPEG, a zero-byte file,
    an empty caption."""
    folder = tmp_path_factory.mktemp("messy")
    root = os.path.dirname(demo_csv)
    rows = data.read_csv(demo_csv)[::100][:24]
    (folder / "zero.jpg").write_bytes(b"")
    with open(os.path.join(root, rows[0][0]), "rb") as f:
        (folder / "cut.jpg").write_bytes(f.read()[:500])
    good = [f"{os.path.join(root, path)},{caption}" for path, caption in rows]
    bad = [f"{folder}/cut.jpg,cut", f"{folder}/zero.jpg,zero",
           f"{os.path.join(root, rows[10][0])}, "]
    lines = ["image_path,caption"] + good[:10] + bad + good[11:]
    (folder / "messy.csv").write_text("\n".join(lines) + "\n")
    return folder / "messy.csv"


@pytest.mark.slow
def test_a_bad_image_stops_the_run_with_its_row(messy_csv, tmp_path):
    result = run_train("--train-data", messy_csv, "--allow-absolute-paths", "--batch-size", 26,
                       "--max-steps", 1, "--workers", 1, "--output-dir", tmp_path / "run",
                       check=False)
    assert result.returncode == 2
    message = error_line(result)
    # The row by its number and its file, as written in the CSV (not "data row 1", which
    # "data row 11" would match too).
    found = re.search(r"data row (\d+) \((.+?)\): (unreadable image|empty caption)", message)
    assert found, message
    path, _ = data.read_csv(str(messy_csv))[int(found[1]) - 1]
    assert found[2] == path and int(found[1]) in (11, 12, 13), message
    assert "--bad-samples skip" in message


@pytest.mark.slow
def test_bad_samples_skip_is_decided_before_training_and_deterministic(messy_csv, tmp_path):
    data_flags = ["--train-data", messy_csv, "--allow-absolute-paths"]
    flags = [*data_flags, "--batch-size", 4, "--max-steps", 3, "--bad-samples", "skip",
             "--workers", 0]
    runs = []
    started = [start_train(*flags, "--output-dir", tmp_path / name, nproc=2) for name in "ab"]
    for name, job in zip("ab", started):
        printed = finish_train(job).stdout
        listed = tmp_path / name / "bad_samples.json"
        assert f"--bad-samples skip: 3 of 26 rows left out, listed in {listed}" in printed
        checkpoint = tmp_path / name / "checkpoints" / "latest.pt"
        runs.append(torch.load(checkpoint, weights_only=True)["model"])
        bad = json.load(open(tmp_path / name / "bad_samples.json"))
        assert list(bad) == ["data row 11", "data row 12", "data row 13"]
        assert "empty caption" in bad["data row 13"]
        manifest = json.load(open(tmp_path / name / "manifest.json"))
        assert manifest["train_data"]["bad_rows"] == 3
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    checked = run_train(*data_flags, "--batch-size", 4, "--max-steps", 3, "--check-data",
                        "--output-dir", tmp_path / "c", check=False)
    assert checked.returncode == 2
    assert re.search(r"3 bad rows; data row 11\b", error_line(checked))


# ----------------------------------------------------------------------------- flags

@pytest.mark.parametrize("flags, expected", [
    (["--batch-size", "0"], "--batch-size"),
    (["--epochs", "0"], "--epochs"),
    (["--rrc-scale", "1.5"], "--rrc-scale"),
    (["--rrc-scale", "0"], "--rrc-scale"),
    (["--accum-steps", "0"], "--accum-steps"),
    (["--lr", "-1"], "--lr"),
    (["--resume", "auto"], "--output-dir")])
def test_impossible_flags_are_rejected_before_any_work(flags, expected):
    assert expected in one_line_exit(train.parse_args, flags)


@pytest.mark.slow
def test_a_batch_larger_than_the_data_is_rejected(small_csv, demo_csv, tmp_path):
    # `python train.py` itself: what a user sees, from the command line.
    result = run_train("--train-data", small_csv, "--image-root", os.path.dirname(demo_csv),
                       "--batch-size", 32, "--accum-steps", 2, "--output-dir", tmp_path,
                       check=False, launcher="command")
    assert result.returncode == 2
    message = error_line(result)
    assert str(small_csv) in message
    assert "48 usable rows, fewer than one global batch of 64" in message


# ----------------------------------------------------------------------------- faults

SLOW_WRITER = """
import sys, time; sys.path.insert(0, {repo!r}); from support import files
def slow(tmp):
    open(tmp, "wb").write(b"half a checkpoint")
    print("writing", flush=True); time.sleep(60)
files.atomic_write({target!r}, slow)"""


@pytest.mark.slow
def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one_intact(tmp_path):
    target = tmp_path / "step_2.pt"
    torch.save({"step": 2}, target)
    program = SLOW_WRITER.format(repo=REPO, target=str(target))
    writer = subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "writing"
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=60)
    assert torch.load(target, weights_only=True) == {"step": 2}
    # And a killed run's half-written tokenizer folder.
    (tmp_path / "tokenizer.tmp123").mkdir()
    (tmp_path / "tokenizer.tmp123" / "vocab.json").write_text("{")
    run_folder.remove_leftovers(tmp_path)  # what the next run does first
    assert sorted(os.listdir(tmp_path)) == ["step_2.pt"]
    os.makedirs(tmp_path / "run" / "checkpoints")
    os.replace(target, tmp_path / "run" / "checkpoints" / "step_2.pt")
    damaged = tmp_path / "run" / "checkpoints" / "step_3.pt"
    damaged.write_bytes(b"garbage from a dying disk")
    path, checkpoint = run_folder.find_resume_checkpoint(str(tmp_path / "run"))
    assert path.endswith("step_2.pt") and checkpoint == {"step": 2}


def disk_full(obj, path):
    """torch.save on a full disk: part of the file, then ENOSPC."""
    with open(path, "wb") as f:
        f.write(b"partial")
    raise OSError(28, "No space left on device")


def half_a_tokenizer(tmp):
    """A tokenizer folder's write on a full disk."""
    os.makedirs(tmp)
    (Path(tmp) / "vocab.json").write_text("{")
    raise OSError(28, "No space left on device")


def test_a_full_disk_gives_a_clear_message_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    os.makedirs(tmp_path / "checkpoints")
    run_folder.save_checkpoint(str(tmp_path), {"step": 1})
    monkeypatch.setattr(torch, "save", disk_full)
    message = one_line_exit(run_folder.save_checkpoint, str(tmp_path), {"step": 2})
    assert "No space left on device" in message and "choose another output folder" in message
    monkeypatch.undo()
    latest = torch.load(tmp_path / "checkpoints" / "latest.pt", weights_only=True)
    assert latest == {"step": 1}
    # No partial file left.
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest.pt", "step_1.pt"]
    # Folders too (RUN/tokenizer): none half-written, no temp folder left.
    tokenizer = str(tmp_path / "tokenizer")
    message = one_line_exit(files.atomic_write, tokenizer, half_a_tokenizer)
    assert "No space left on device" in message
    assert sorted(os.listdir(tmp_path)) == ["checkpoints"]


def test_an_unwritable_output_dir_is_refused(tmp_path):
    (tmp_path / "a_file").write_text("")
    run_dir = str(tmp_path / "a_file" / "run")
    args = train.parse_args(["--output-dir", run_dir])
    message = one_line_exit(run_folder.make_run_dir, args)
    assert run_dir in message and "cannot create it" in message


# lr 1e30 from the first step (no warm-up): step 1's update leaves finite but enormous weights
# (~1e30), whose activations overflow, so the loss of step 2 is not finite, nor that of any step
# after it while the weights stay put. Each step saved and logged.
NONFINITE = ["--batch-size", 8, "--max-steps", 6, "--save-every", 1, "--log-every", 1,
             "--workers", 0, "--lr", 1e30, "--warmup", 0]
FIRST_BAD_STEP = 2


def nonfinite_run(small_csv, demo_csv, out, *flags):
    return run_train("--train-data", small_csv, "--image-root", os.path.dirname(demo_csv),
                     "--output-dir", out, *NONFINITE, *flags, check=False)


def assert_same_weights_and_moments(a, b):
    """Two checkpoints hold the same weights and optimizer moments, to the bit."""
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for i, state in a["optimizer"]["state"].items():
        for name in state:
            assert torch.equal(state[name], b["optimizer"]["state"][i][name]), (i, name)


def load(path):
    return torch.load(path, weights_only=True)


def assert_finite(checkpoint):
    for name, tensor in checkpoint["model"].items():
        assert torch.isfinite(tensor).all(), f"step {checkpoint['step']}: {name} is not finite"


@pytest.fixture(scope="module")
def stopped_at_nonfinite(small_csv, demo_csv, tmp_path_factory):
    """The run folder and result of NONFINITE without --skip-nonfinite."""
    out = tmp_path_factory.mktemp("nonfinite") / "stopped"
    return out, nonfinite_run(small_csv, demo_csv, out)


@pytest.mark.slow
def test_a_nonfinite_loss_stops_with_its_step_and_keeps_the_good_checkpoint(
        stopped_at_nonfinite):
    out, result = stopped_at_nonfinite
    assert result.returncode == 2
    message = error_line(result)
    found = re.search(r"the loss or its gradient was not finite at step (\d+); the last good "
                      r"checkpoint is kept in (\S+)\. ", message)
    assert found and int(found[1]) == FIRST_BAD_STEP, message
    assert found[2] == f"{out}/checkpoints"
    # Saved up to the step before, and nothing at the bad step.
    folder = out / "checkpoints"
    saved = sorted(int(p.name[5:-3]) for p in folder.glob("step_*.pt"))
    assert saved == list(range(1, FIRST_BAD_STEP))
    latest = load(folder / "latest.pt")
    assert latest["step"] == FIRST_BAD_STEP - 1
    assert_finite(latest)
    # Nor logged: every step before, each with a finite loss.
    records = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in records] == list(range(1, FIRST_BAD_STEP))
    assert all(np.isfinite(r["loss"]) for r in records)


@pytest.mark.slow
def test_skipped_nonfinite_steps_change_nothing_and_too_many_stop_the_run(
        small_csv, demo_csv, stopped_at_nonfinite, tmp_path):
    before_the_bad_steps = load(stopped_at_nonfinite[0] / "checkpoints" / "latest.pt")
    # Steps 2 to 6 are bad: all 5 skipped, and the weights and moments stay those of step 1.
    result = nonfinite_run(small_csv, demo_csv, tmp_path / "skip", "--skip-nonfinite", 5)
    assert result.returncode == 0, result.stderr[-3000:]
    for step in (5, 6):  # the last two are kept
        checkpoint = load(tmp_path / "skip" / "checkpoints" / f"step_{step}.pt")
        assert_same_weights_and_moments(checkpoint, before_the_bad_steps)
    manifest = json.load(open(tmp_path / "skip" / "manifest.json"))
    assert manifest["skipped_nonfinite_steps"] == [2, 3, 4, 5, 6]
    # A third bad step with --skip-nonfinite 2 stops the run, naming the steps.
    result = nonfinite_run(small_csv, demo_csv, tmp_path / "limit", "--skip-nonfinite", 2)
    assert result.returncode == 2
    message = error_line(result)
    assert "non-finite loss or gradient at steps [2, 3, 4], more than --skip-nonfinite 2" in message
    assert f"{tmp_path / 'limit'}/checkpoints" in message
    latest = load(tmp_path / "limit" / "checkpoints" / "latest.pt")
    assert latest["step"] == 3
    assert_same_weights_and_moments(latest, before_the_bad_steps)


@pytest.mark.slow
def test_a_nonfinite_gradient_never_reaches_a_saved_checkpoint(small_csv, demo_csv, tmp_path):
    # At lr 1e3 the loss of steps 1 and 2 is finite, yet step 2's gradient is not (the backward
    # pass overflows first), and the loss of step 3 follows (measured: lr 30 to 1e4).
    result = nonfinite_run(small_csv, demo_csv, tmp_path, "--lr", 1e3)
    assert result.returncode == 2, result.stderr[-3000:]
    for path in sorted((tmp_path / "checkpoints").glob("step_*.pt")):
        assert_finite(load(path))


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_torchrun(small_csv, demo_csv, out, *flags, log, restarts=0,
                   launcher=("--standalone", "--nproc_per_node=2"), env=()):
    """small_run's training under `torchrun --nproc_per_node=2`, in a session of its own,
    printing into `log`."""
    command = [sys.executable, "-m", "torch.distributed.run", *launcher,
               f"--max-restarts={restarts}", os.path.join(REPO, "train.py"),
               "--train-data", small_csv, "--image-root", os.path.dirname(demo_csv),
               "--output-dir", out, "--workers", "0", *map(str, flags)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **dict(env)}
    return subprocess.Popen(command, cwd=REPO, env=environment, start_new_session=True,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def assert_trained_as_if_never_interrupted(reference, run_dir):
    """The same weights and optimizer moments to the bit, and a log with every step once, in
    order."""
    resumed = load(run_dir / "checkpoints" / "latest.pt")
    assert_same_weights_and_moments(reference, resumed)
    logged = [json.loads(line)["step"] for line in open(run_dir / "log.jsonl")]
    assert logged == list(range(1, reference["step"] + 1)), \
        f"the log repeats or skips steps: {logged}"


# How long a job of STEPS may take, start-up included, on a loaded 2-core machine.
DEADLINE = 300


def kill_a_rank_after_step_3(jobs, out, logs):
    """Wait for step 3's checkpoint, then kill -9 one worker of the last torchrun agent."""
    step_3 = out / "checkpoints" / "step_3.pt"
    wait_until(lambda: step_3.exists() or any(job.poll() is not None for job in jobs),
               DEADLINE, f"{step_3} (the log: {logs[-1]})")
    assert step_3.exists(), logs[-1].read_text()[-3000:]
    workers = subprocess.run(["pgrep", "-P", str(jobs[-1].pid)], capture_output=True,
                             text=True).stdout.split()
    assert workers, logs[-1].read_text()[-3000:]
    # One rank dies; torchrun restarts the whole group.
    os.kill(int(workers[-1]), signal.SIGKILL)


@pytest.mark.slow
def test_elastic_restart_after_a_rank_is_killed_resumes_bit_identically(
        small_csv, demo_csv, uninterrupted, tmp_path):
    """One rank dies; torchrun --max-restarts starts a new group, which continues with --resume
    auto.

    First on one node, then on two (two torchrun agents on this machine, one rank each, as
    README's multi-node command with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1). On one node
    torchrun's store outlives the restart and still holds the dead group's gloo addresses;
    unless each attempt keys its process group apart (distributed.setup_distributed), the new ranks
    read them and either dial a dead port or wait on each other forever inside
    init_process_group.
    """
    reference = uninterrupted[1]
    endpoint = f"--rdzv-endpoint=127.0.0.1:{free_port()}"
    two_nodes = ["--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d", endpoint,
                 "--rdzv-id=elastic"]
    one_node = ["--standalone", "--nproc_per_node=2"]
    separate_stores = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    for name, agents, env in [("one_node", [one_node], {}),
                              ("two_nodes", [two_nodes, two_nodes], separate_stores)]:
        out = tmp_path / name
        logs = [tmp_path / f"{name}{i}.log" for i in range(len(agents))]
        jobs = [start_torchrun(small_csv, demo_csv, out, *STEPS, "--resume", "auto", log=log,
                               restarts=1, launcher=launcher, env=env)
                for launcher, log in zip(agents, logs)]
        try:
            kill_a_rank_after_step_3(jobs, out, logs)
            for job, log in zip(jobs, logs):
                assert wait_for_exit(job, DEADLINE, log) == 0, log.read_text()[-3000:]
        finally:
            for job in jobs:
                kill_job(job)  # pass or fail, no worker is left behind
        resumed_at = re.search(r"resuming from \S+ at step (\d+)", logs[0].read_text())
        # The second group really continued a checkpoint.
        assert resumed_at and 3 <= int(resumed_at[1]) < 8, name
        assert_trained_as_if_never_interrupted(reference, out)


def test_restarts_on_several_nodes_sharing_torchruns_store_are_refused_before_they_could_hang(
        monkeypatch):
    """Each node counts its own restarts, so per-attempt keys only agree on one node
    (distributed.setup_distributed)."""
    environment = dict(RANK=0, LOCAL_RANK=0, WORLD_SIZE=16, GROUP_WORLD_SIZE=2,
                       TORCHELASTIC_MAX_RESTARTS=3, TORCHELASTIC_USE_AGENT_STORE=True,
                       TORCHELASTIC_RESTART_COUNT=0)
    for name, value in environment.items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in one_line_exit(distributed.setup_distributed)
    # No restarts, nothing to hang: torchrun's defaults work.
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")
    with pytest.raises(ValueError, match="MASTER_ADDR"):  # past the check, at the rendezvous
        distributed.setup_distributed()


def newest_step(folder):
    """The newest step_<N>.pt in `folder`, 0 if none."""
    return max((int(p.name[5:-3]) for p in folder.glob("step_*.pt")), default=0)


@pytest.mark.slow
def test_kills_of_the_whole_job_at_random_moments_lose_nothing(small_csv, demo_csv, uninterrupted,
                                                               tmp_path):
    """kill -9 of the whole job at three random moments, each followed by --resume auto.

    Start-up (imports) takes most of a run this short and varies by seconds, so each moment is
    drawn from the training of its attempt: from when it writes the manifest to when an
    uninterrupted run finished. It may land before the first checkpoint, between steps or in a
    checkpoint write; with this seed the first comes 7% into training, usually before any
    checkpoint exists. Seeded, so repeatable.
    """
    whole, reference = uninterrupted
    times = json.load(open(whole / "manifest.json"))
    started = datetime.fromisoformat(times["started"])
    training = (datetime.fromisoformat(times["finished"]) - started).total_seconds()
    rng = random.Random(66)
    out = tmp_path / "killed"
    manifest = out / "manifest.json"
    saved = []
    for attempt in range(3):
        written = manifest.exists() and os.path.getmtime(manifest)
        log = tmp_path / f"{attempt}.log"
        job = start_torchrun(small_csv, demo_csv, out, *STEPS, "--resume", "auto", log=log)

        def training_started():  # this attempt's manifest is written (or it ended)
            fresh = manifest.exists() and os.path.getmtime(manifest) != written
            return fresh or job.poll() is not None

        try:
            wait_until(training_started, DEADLINE, f"attempt {attempt} to start ({log})")
            time.sleep(rng.uniform(0, training))
        finally:
            kill_job(job)
        saved.append(newest_step(out / "checkpoints"))
    assert any(0 < step < 8 for step in saved), \
        f"no kill landed mid-run; newest checkpoint after each: {saved}"
    small_run(small_csv, demo_csv, out, *STEPS, "--resume", "auto", nproc=2)
    assert_trained_as_if_never_interrupted(reference, out)
    assert not list(out.glob("**/*.tmp*")), "a killed write left a temp file"


# ----------------------------------------------------------------------------- untrusted files

class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_malicious_checkpoint_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model": RunsCode(marker)}, evil)  # a real pickle that would run a shell command
    from model import CLIP
    from support.pretrained import read_weights_file
    # What --resume, --pretrained and evaluate.py use.
    for read in (read_weights_file, CLIP.from_pretrained):
        message = one_line_exit(read, str(evil))
        assert str(evil) in message
    assert not marker.exists()


# ----------------------------------------------------------------------------- shortened flags

@pytest.mark.parametrize("command, argv", [
    ("evaluate", ["--runs", "r", "--figur", "x.png"]), ("bench", ["--step", "2"]),
    ("data", ["resize", "a.csv", "out", "--short", "128"]), ("model", ["--export-h", "a", "b"]),
    ("grid", ["write", "out", "--seed", "1"]),
])
def test_every_command_refuses_a_shortened_flag(command, argv, capsys):
    """argparse accepts a prefix of a flag by default; a script that says --step would silently
    mean whatever flag --step prefixes today. Every parser here refuses it."""
    import importlib
    main = importlib.import_module(command)
    parse = main.parse_args if command in ("evaluate", "bench", "grid") else main.main
    with pytest.raises(SystemExit) as exit:
        parse(argv)
    assert exit.value.code == 2
    error = capsys.readouterr().err
    # model.py's one flag is required: its prefix leaves it missing.
    assert "unrecognized arguments: " in error or "required: --export-hf" in error
