"""Bad input gets one clear line naming the file, the row and the fix; faults lose nothing; loaded files
never run code. Real files in tmp_path, real processes, real kills."""
import json
import os
import pickle
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
import plumbing
import train
from conftest import REPO, STEPS, kill_job, run_train, small_run
from plumbing import UsageError


def one_line_exit(call, *args, **kwargs):
    with pytest.raises(UsageError) as error:
        call(*args, **kwargs)
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def write_csv(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding))
    return str(path)


# ----------------------------------------------------------------------------- CSV

def test_csv_problems_are_named_with_the_fix(tmp_path):
    assert "no such file" in one_line_exit(data.read_csv, str(tmp_path / "missing.csv"))
    assert "empty" in one_line_exit(data.read_csv, write_csv(tmp_path / "empty.csv", ""))
    message = one_line_exit(data.read_csv, write_csv(tmp_path / "cols.csv", "path,text\na.jpg,b\n"))
    assert "no column 'image_path'" in message and "['path', 'text']" in message and "--csv-img-key" in message
    message = one_line_exit(data.read_csv, write_csv(tmp_path / "semi.csv", "image_path;caption\na.jpg;b\n"))
    assert "--csv-separator" in message  # one column found: the separator is the likely culprit
    assert "no rows" in one_line_exit(data.read_csv, write_csv(tmp_path / "header.csv", "image_path,caption\n"))


def test_csv_quoting_bom_separator_and_duplicates(tmp_path, capsys):
    text = 'image_path,caption,other\na.jpg,"tumour, grade 2\nsecond line",x\na.jpg,"tumour, grade 2\nsecond line",x\n'
    rows = data.read_csv(write_csv(tmp_path / "bom.csv", text, "utf-8-sig"))
    assert rows == [("a.jpg", "tumour, grade 2\nsecond line")] * 2
    assert "1 duplicate rows" in capsys.readouterr().out
    tsv = write_csv(tmp_path / "pairs.tsv", "filepath\ttitle\nb.jpg\tlymph node, benign\n")
    assert data.read_csv(tsv, "filepath", "title") == [("b.jpg", "lymph node, benign")]


def test_image_paths_outside_the_image_root_are_refused(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "slides").symlink_to(tmp_path / "elsewhere")  # a dataset folder on another disk
    root = str(tmp_path / "root")
    for bad in ["../../etc/passwd", "slides/../x.jpg", "slides/../../x.jpg", "..\\x.jpg", "/etc/passwd"]:
        rows = [("ok.jpg", "fine"), ("slides/a.jpg", "symlinked, fine"), (bad, "sneaky")]
        message = one_line_exit(data.check_paths, [path for path, _ in rows], root, "pairs.csv", allow_absolute=False)
        assert "data row 3" in message and repr(bad) in message and "--allow-absolute-paths" in message
    data.check_paths(["/abs/ok.jpg"], root, "pairs.csv", allow_absolute=True)


# ----------------------------------------------------------------------------- images

def test_every_readable_image_mode_becomes_the_right_rgb(tmp_path):
    red = np.zeros((40, 40, 3), np.uint8)
    red[..., 0] = 200
    cases = {
        "gray.png": (Image.fromarray(np.full((40, 40), 100, np.uint8)), (100, 100, 100)),
        "gray16.png": (Image.fromarray(np.full((40, 40), 100 * 256, np.uint16)), (100, 100, 100)),
        "rgba.png": (Image.fromarray(np.dstack([red, np.zeros((40, 40), np.uint8)])), (255, 255, 255)),  # transparent: white
        "palette.png": (Image.fromarray(red).convert("P"), (200, 0, 0)),
        "cmyk.jpg": (Image.fromarray(red).convert("CMYK"), (200, 0, 0)),
        "tiny.jpg": (Image.fromarray(red[:3, :3]), (200, 0, 0)),
    }
    for name, (image, expected) in cases.items():
        image.save(tmp_path / name)
        rgb = data.load_rgb(tmp_path / name)
        assert rgb.mode == "RGB"
        assert np.abs(np.asarray(rgb)[1, 1].astype(int) - expected).max() <= 6, name  # JPEG and the web palette round
    # A crop larger than a tiny image still works: RandomResizedCrop upsamples.
    assert data.train_transform(data.load_rgb(tmp_path / "tiny.jpg"), 64, 0.8, seed=0).shape == (3, 64, 64)


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
    """24 good demo rows and three bad ones: a truncated JPEG, a zero-byte file, an empty caption."""
    folder = tmp_path_factory.mktemp("messy")
    root = os.path.dirname(demo_csv)
    rows = data.read_csv(demo_csv)[::100][:24]
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "cut.jpg").write_bytes(open(os.path.join(root, rows[0][0]), "rb").read()[:500])
    lines = ["image_path,caption"] + [f"{os.path.join(root, p)},{c}" for p, c in rows[:10]]
    lines += [f"{folder}/cut.jpg,cut", f"{folder}/zero.jpg,zero", f"{os.path.join(root, rows[10][0])}, "]
    lines += [f"{os.path.join(root, p)},{c}" for p, c in rows[11:]]
    (folder / "messy.csv").write_text("\n".join(lines) + "\n")
    return folder / "messy.csv"


@pytest.mark.slow
def test_a_bad_image_stops_the_run_with_its_row(messy_csv, tmp_path):
    result = run_train("--train-data", messy_csv, "--allow-absolute-paths", "--batch-size", 26, "--max-steps", 1,
                       "--workers", 1, "--output-dir", tmp_path / "run", check=False)
    assert result.returncode == 2
    assert any("data row 1" in line and "--bad-samples skip" in line for line in result.stderr.splitlines())
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_bad_samples_skip_is_decided_before_training_and_deterministic(messy_csv, tmp_path):
    flags = ["--train-data", messy_csv, "--allow-absolute-paths", "--batch-size", 4, "--max-steps", 3,
             "--bad-samples", "skip", "--workers", 0]
    runs = []
    for name, nproc in (("a", 2), ("b", 2)):
        run_train(*flags, "--output-dir", tmp_path / name, nproc=nproc)
        runs.append(torch.load(tmp_path / name / "checkpoints" / "latest.pt", weights_only=True)["model"])
        bad = json.load(open(tmp_path / name / "bad_samples.json"))
        assert list(bad) == ["data row 11", "data row 12", "data row 13"]
        assert "empty caption" in bad["data row 13"]
        assert json.load(open(tmp_path / name / "manifest.json"))["train_data"]["bad_rows"] == 3
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    checked = run_train(*flags[:-4], "--check-data", "--output-dir", tmp_path / "c", check=False)
    assert checked.returncode == 2 and "3 bad rows; data row 11" in checked.stderr


# ----------------------------------------------------------------------------- flags

@pytest.mark.parametrize("flags, expected", [
    (["--batch-size", "0"], "--batch-size"), (["--epochs", "0"], "--epochs"), (["--rrc-scale", "1.5"], "--rrc-scale"),
    (["--rrc-scale", "0"], "--rrc-scale"), (["--accum-steps", "0"], "--accum-steps"), (["--lr", "-1"], "--lr"),
    (["--resume", "auto"], "--output-dir")])
def test_impossible_flags_are_rejected_before_any_work(flags, expected):
    assert expected in one_line_exit(train.parse_args, flags)


@pytest.mark.slow
def test_a_batch_larger_than_the_data_is_rejected(small_csv, demo_csv, tmp_path):
    result = run_train("--train-data", small_csv, "--image-root", os.path.dirname(demo_csv), "--batch-size", 32,
                       "--accum-steps", 2, "--output-dir", tmp_path, check=False)
    assert result.returncode != 0 and "48 usable rows, fewer than one global batch of 64" in result.stderr
    assert "Traceback" not in result.stderr


# ----------------------------------------------------------------------------- faults

@pytest.mark.slow
def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one_intact(tmp_path):
    target = tmp_path / "step_2.pt"
    torch.save({"step": 2}, target)
    writer = subprocess.Popen([sys.executable, "-c", f"""
import sys, time; sys.path.insert(0, {REPO!r}); import plumbing
def slow(tmp):
    open(tmp, "wb").write(b"half a checkpoint")
    print("writing", flush=True); time.sleep(60)
plumbing.atomic_write({str(target)!r}, slow)"""], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "writing"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert torch.load(target, weights_only=True) == {"step": 2}
    (tmp_path / "tokenizer.tmp123").mkdir()  # and a killed run's half-written tokenizer folder
    (tmp_path / "tokenizer.tmp123" / "vocab.json").write_text("{")
    plumbing.remove_leftovers(tmp_path)  # what the next run does first
    assert sorted(os.listdir(tmp_path)) == ["step_2.pt"]
    os.makedirs(tmp_path / "run" / "checkpoints")
    os.replace(target, tmp_path / "run" / "checkpoints" / "step_2.pt")
    (tmp_path / "run" / "checkpoints" / "step_3.pt").write_bytes(b"garbage from a dying disk")
    path, checkpoint = train.find_resume_checkpoint(str(tmp_path / "run"))
    assert path.endswith("step_2.pt") and checkpoint == {"step": 2}


def test_a_full_disk_gives_a_clear_message_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    os.makedirs(tmp_path / "checkpoints")
    train.save_checkpoint(str(tmp_path), {"step": 1})
    def disk_full(obj, path):
        open(path, "wb").write(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", disk_full)
    message = one_line_exit(train.save_checkpoint, str(tmp_path), {"step": 2})
    assert "No space left on device" in message and "choose another output folder" in message
    monkeypatch.undo()
    assert torch.load(tmp_path / "checkpoints" / "latest.pt", weights_only=True) == {"step": 1}
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest.pt", "step_1.pt"]  # no partial file left
    def half_a_tokenizer(tmp):  # folders too (RUN/tokenizer): none half-written, no temp folder left
        os.makedirs(tmp)
        (Path(tmp) / "vocab.json").write_text("{")
        raise OSError(28, "No space left on device")
    assert "No space left on device" in one_line_exit(plumbing.atomic_write, str(tmp_path / "tokenizer"), half_a_tokenizer)
    assert sorted(os.listdir(tmp_path)) == ["checkpoints"]


def test_an_unwritable_output_dir_is_refused(tmp_path):
    (tmp_path / "a_file").write_text("")
    args = train.parse_args(["--output-dir", str(tmp_path / "a_file" / "run")])
    assert "cannot create it" in one_line_exit(train.make_run_dir, args)


@pytest.mark.slow
def test_a_nonfinite_loss_stops_with_its_step_and_keeps_the_good_checkpoint(small_csv, demo_csv, tmp_path):
    common = ["--train-data", small_csv, "--image-root", os.path.dirname(demo_csv), "--batch-size", 8,
              "--max-steps", 6, "--save-every", 1, "--workers", 0]
    result = run_train(*common, "--lr", "1e30", "--warmup", 0, "--output-dir", tmp_path / "a", check=False)
    assert result.returncode == 2 and "the loss was not finite at step" in result.stderr
    for path in (tmp_path / "a" / "checkpoints").glob("step_*.pt"):  # whatever was saved is finite
        weights = torch.load(path, weights_only=True)["model"]
        assert all(torch.isfinite(t).all() for t in weights.values())
    run_train(*common, "--lr", "1e30", "--warmup", 0, "--skip-nonfinite", 6, "--output-dir", tmp_path / "b")
    assert json.load(open(tmp_path / "b" / "manifest.json"))["skipped_nonfinite_steps"]


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_torchrun(small_csv, demo_csv, out, *flags, log, restarts=0, launcher=("--standalone", "--nproc_per_node=2"),
                   env=()):
    """small_run's training under `torchrun --nproc_per_node=2`, in a session of its own, printing into `log`."""
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *launcher, f"--max-restarts={restarts}",
                             os.path.join(REPO, "train.py"), "--train-data", small_csv,
                             "--image-root", os.path.dirname(demo_csv), "--output-dir", out, "--workers", "0",
                             *map(str, flags)], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", **dict(env)},
                            start_new_session=True, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def assert_trained_as_if_never_interrupted(reference, run_dir):
    """The same weights and optimizer moments to the bit, and a log with every step once, in order."""
    resumed = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)
    assert all(torch.equal(reference["model"][k], resumed["model"][k]) for k in reference["model"])
    for i, state in reference["optimizer"]["state"].items():
        assert all(torch.equal(state[k], resumed["optimizer"]["state"][i][k]) for k in state)
    logged = [json.loads(line)["step"] for line in open(run_dir / "log.jsonl")]
    assert logged == list(range(1, reference["step"] + 1)), f"the log repeats or skips steps: {logged}"


@pytest.mark.slow
def test_elastic_restart_after_a_rank_is_killed_resumes_bit_identically(small_csv, demo_csv, uninterrupted, tmp_path):
    """One rank dies; torchrun --max-restarts starts a new group, which continues with --resume auto.

    First on one node, then on two (two torchrun agents on this machine, one rank each, as README's
    multi-node command with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1). On one node torchrun's store outlives the
    restart and still holds the dead group's gloo addresses; unless each attempt keys its process group apart
    (plumbing.setup_distributed), the new ranks read them and either dial a dead port or wait on each other
    forever inside init_process_group.
    """
    reference = uninterrupted[1]
    endpoint = f"--rdzv-endpoint=127.0.0.1:{free_port()}"
    two_nodes = ["--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d", endpoint, "--rdzv-id=elastic"]
    for name, agents, env in [("one_node", [["--standalone", "--nproc_per_node=2"]], {}),
                              ("two_nodes", [two_nodes, two_nodes], {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})]:
        out, logs = tmp_path / name, [tmp_path / f"{name}{i}.log" for i in range(len(agents))]
        jobs = [start_torchrun(small_csv, demo_csv, out, *STEPS, "--resume", "auto", log=log, restarts=1,
                               launcher=launcher, env=env) for launcher, log in zip(agents, logs)]
        try:
            while not (out / "checkpoints" / "step_3.pt").exists() and all(job.poll() is None for job in jobs):
                time.sleep(0.05)
            workers = subprocess.run(["pgrep", "-P", str(jobs[-1].pid)], capture_output=True, text=True).stdout
            os.kill(int(workers.split()[-1]), signal.SIGKILL)  # one rank dies; torchrun restarts the whole group
            for job, log in zip(jobs, logs):
                assert job.wait(timeout=120) == 0, log.read_text()[-3000:]
        finally:
            for job in jobs:
                kill_job(job)  # pass or fail, no worker is left behind
        resumed_at = re.search(r"resuming from \S+ at step (\d+)", logs[0].read_text())
        assert resumed_at and 3 <= int(resumed_at[1]) < 8, name  # the second group really continued a checkpoint
        assert_trained_as_if_never_interrupted(reference, out)


def test_restarts_on_several_nodes_sharing_torchruns_store_are_refused_before_they_could_hang(monkeypatch):
    """Each node counts its own restarts, so per-attempt keys only agree on one node (plumbing.setup_distributed)."""
    for name, value in dict(RANK=0, LOCAL_RANK=0, WORLD_SIZE=16, GROUP_WORLD_SIZE=2, TORCHELASTIC_MAX_RESTARTS=3,
                            TORCHELASTIC_USE_AGENT_STORE=True, TORCHELASTIC_RESTART_COUNT=0).items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in one_line_exit(plumbing.setup_distributed)
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")  # no restarts, nothing to hang: torchrun's defaults work
    with pytest.raises(ValueError, match="MASTER_ADDR"):  # past the check, at the rendezvous
        plumbing.setup_distributed()


@pytest.mark.slow
def test_kills_of_the_whole_job_at_random_moments_lose_nothing(small_csv, demo_csv, uninterrupted, tmp_path):
    """kill -9 of the whole job at three random moments, each followed by --resume auto.

    Start-up (imports) takes most of a run this short and varies by seconds, so each moment is drawn
    from the training of its attempt: from when it writes the manifest to when an uninterrupted run
    finished. It may land before the first checkpoint, between steps or in a checkpoint write; with
    this seed the first comes 7% into training, usually before any checkpoint exists. Seeded, so repeatable.
    """
    whole, reference = uninterrupted
    times = json.load(open(whole / "manifest.json"))
    training = (datetime.fromisoformat(times["finished"]) - datetime.fromisoformat(times["started"])).total_seconds()
    rng, out, saved = random.Random(66), tmp_path / "killed", []
    manifest = out / "manifest.json"
    for attempt in range(3):
        written = manifest.exists() and os.path.getmtime(manifest)
        job = start_torchrun(small_csv, demo_csv, out, *STEPS, "--resume", "auto", log=tmp_path / f"{attempt}.log")
        while job.poll() is None and (not manifest.exists() or os.path.getmtime(manifest) == written):
            time.sleep(0.01)  # this attempt has not started training yet
        time.sleep(rng.uniform(0, training))
        kill_job(job)
        saved.append(max((int(p.name[5:-3]) for p in (out / "checkpoints").glob("step_*.pt")), default=0))
    assert any(0 < step < 8 for step in saved), f"no kill landed mid-run; newest checkpoint after each: {saved}"
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
    marker, evil = tmp_path / "pwned", tmp_path / "evil.pt"
    torch.save({"model": RunsCode(marker)}, evil)  # a real pickle that would run a shell command
    from model import CLIP, read_weights_file
    for load in (read_weights_file, CLIP.from_pretrained):  # what --resume, --pretrained and evaluate.py use
        message = one_line_exit(load, str(evil))
        assert str(evil) in message
    assert not marker.exists()
