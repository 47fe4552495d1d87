"""Shared fixtures: the demo dataset and one short demo training run, made once per test session.

Two tiers (pytest.ini): tests that launch processes or train carry @pytest.mark.slow, and
`python -m pytest -q -m "not slow"` runs the rest in about a minute. One exception: the gloo
process groups of test_loss.py stay in the quick tier, for they are the proof of the loss.

Training jobs of one thread per process fork from the test process, sharing its imports (see
start_train); those whose launch is the point run as the README's commands, python and torchrun.
"""
import contextlib
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# Fixtures that train (here and in test files); a test that asks for one (even through another
# fixture) is slow.
TRAINING_FIXTURES = {"demo_run", "uninterrupted", "stopped_at_nonfinite"}


def pytest_collection_modifyitems(config, items):
    """Keep the quick tier quick: refuse a test that trains without @pytest.mark.slow.

    Otherwise `-m "not slow"` would quietly start the session's demo training for it.
    """
    for item in items:
        trains = TRAINING_FIXTURES.intersection(getattr(item, "fixturenames", ()))
        if trains and item.get_closest_marker("slow") is None:
            raise pytest.UsageError(
                f"{item.nodeid} uses {sorted(trains)}, which train: mark it @pytest.mark.slow")


def pytest_sessionfinish(session, exitstatus):
    """Stop the forked jobs a failed test left running: Python waits for them before it exits."""
    for job in list(LIVE_JOBS):
        job.kill()


def start_train(*flags, nproc=1, env=None, launcher=None):
    """Start a training job of `nproc` processes; finish_train waits for it. Several jobs may run
    at once. `launcher`:
    - "command": train.py as users start it, `python train.py` for one process and `torchrun`
      for several; each process pays the imports (torch, torchvision, transformers: ~5-9 s here).
    - "fork" (the default for one thread per process on a machine without CUDA): the same
      train.main in processes forked from this one, whose imports they share, joined by a real
      gloo group (RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT, as torchrun sets them). Only
      with one thread: GNU OpenMP's thread pool does not survive a fork, and a child that asks it
      for two threads waits forever; nor does a GPU's CUDA. A usage error exits with status 2
      on every rank, where torchrun reports 1: a test of that on several ranks is a command.
    """
    # One thread per process, unless `env` says otherwise: a short run is mostly start-up, which a
    # fork saves. A thread count is part of what bit-identity needs; runs compared bit for bit
    # use the same.
    env = {"OMP_NUM_THREADS": "1", **(env or {})}
    if launcher is None:
        can_fork = env["OMP_NUM_THREADS"] == "1" and not torch.cuda.is_available()
        launcher = "fork" if can_fork else "command"
    # Files, not pipes: a job whose pipe nobody reads yet would stop at the first full buffer.
    output = (tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+"))
    flags = [str(flag) for flag in flags]
    if launcher == "fork":
        if env["OMP_NUM_THREADS"] != "1":
            raise ValueError("a forked job runs one thread per process; use launcher='command'")
        return ForkedJob(flags, nproc, env, output)
    if nproc == 1:
        command = [sys.executable]
    else:
        command = [sys.executable, "-m", "torch.distributed.run",
                   "--standalone", f"--nproc_per_node={nproc}"]
    command += [os.path.join(REPO, "train.py"), *flags]
    job = subprocess.Popen(command, cwd=REPO, text=True, stdout=output[0], stderr=output[1],
                           env={**os.environ, **env})
    job.output_files = output  # Popen keeps only pipes, as job.stdout and job.stderr
    return job


PORTS_GIVEN = set()  # the kernel may offer a port it offered a moment ago, still unused
LIVE_JOBS = set()    # the ForkedJobs not yet waited for to the end


def free_port():
    """A port free now that no job of this session has been given before."""
    while True:
        with contextlib.closing(socket.socket()) as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port not in PORTS_GIVEN:
            PORTS_GIVEN.add(port)
            return port


def train_in_fork(rank, world, port, flags, env, output):
    """One rank of a ForkedJob: torchrun's environment, `output` as stdout and stderr, then
    train.main as `python train.py` runs it (a UsageError: one line and exit status 2)."""
    import tqdm
    import train
    from support import errors
    os.chdir(REPO)
    os.environ.update(env)
    if world > 1:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # tqdm's lock is a semaphore shared with every fork once this process has drawn a bar (or
    # held by its monitor thread at the fork); a rank killed while it holds it would stop every
    # later job's bars. Each rank takes a lock of its own.
    tqdm.tqdm.set_lock(threading.RLock())
    for stream, file in zip((1, 2), output):
        os.dup2(file.fileno(), stream)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    sys.argv = [os.path.join(REPO, "train.py"), *flags]
    errors.run_main(lambda: train.main(flags))


def share_imports():
    """Import here, once, what every forked child would import on its own."""
    import torch._dynamo  # noqa: F401  (DDP imports it on first use)
    import train  # noqa: F401  (and through it torch, torchvision, data, model, evaluate)
    from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: F401  (data.py's)
    assert not torch.distributed.is_initialized(), "a child would inherit this process group"


class ForkedJob:
    """`nproc` forked processes training together, waited for as one job (see start_train)."""

    def __init__(self, flags, nproc, env, output):
        share_imports()
        self.args = ["train.py", *flags]
        self.output_files = output
        self.returncode = None
        port = free_port()
        context = torch.multiprocessing.get_context("fork")
        self.processes = [context.Process(target=train_in_fork,
                                          args=(rank, nproc, port, flags, env, output))
                          for rank in range(nproc)]
        for process in self.processes:
            process.start()
        LIVE_JOBS.add(self)

    def wait(self, timeout=None):
        """The job's exit status: the first rank's that failed, else 0. A rank that fails stops
        the others, as torchrun does, for they would wait for it in a collective."""
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            codes = [process.exitcode for process in self.processes]
            failed = [code for code in codes if code not in (None, 0)]
            if failed or None not in codes:
                self.kill()
                self.returncode = failed[0] if failed else 0
            elif time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            else:
                time.sleep(0.05)
        return self.returncode

    def kill(self):
        for process in self.processes:
            if process.is_alive():
                process.kill()
            process.join()
        LIVE_JOBS.discard(self)


def finish_train(job, check=True, timeout=600):
    """Wait for a job of start_train; its CompletedProcess, or a failed test if `check`."""
    try:
        job.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        job.kill()
        raise
    output = []
    for file in job.output_files:
        file.seek(0)
        output.append(file.read())
        file.close()
    result = subprocess.CompletedProcess(job.args, job.returncode, *output)
    if check and result.returncode != 0:
        raise AssertionError(f"train.py failed ({result.returncode}):\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def run_train(*flags, nproc=1, env=None, check=True, timeout=600, launcher=None):
    """train.py, start to finish (see start_train)."""
    job = start_train(*flags, nproc=nproc, env=env, launcher=launcher)
    return finish_train(job, check, timeout)


def relative_difference(a, b, names=None):
    """|a - b| / |b| over all the tensors of two state dicts at once (or over those in `names`).

    Not per tensor: the key part of in_proj_bias has an exactly zero gradient (softmax ignores a
    constant added to every key), so its "gradient" is pure rounding noise that Adam normalises
    into full-size steps; per tensor it differs by ~1e-3 between world sizes, while the whole
    model differs by ~5e-7.
    """
    def flatten(state):
        return torch.cat([state[k].flatten() for k in (names or sorted(state))])

    flat_a = flatten(a)
    flat_b = flatten(b)
    return ((flat_a - flat_b).norm() / flat_b.norm()).item()


def kill_job(job):
    """kill -9 a torchrun job started with start_new_session=True, all of it at once, as a power
    cut would.

    torchrun starts each worker in a session of its own, so os.killpg(job.pid) alone kills torchrun
    and leaves its workers training on as orphans, still writing checkpoints into the run folder.
    """
    job.send_signal(signal.SIGSTOP)  # torchrun starts no more workers from here on
    children = subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True, text=True)
    workers = children.stdout.split()
    for group in [job.pid, *map(int, workers)]:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
    job.wait(timeout=60)  # SIGKILL cannot be caught: only a hung kernel could keep it waiting


def wait_until(condition, timeout, what):
    """Poll `condition()` until it holds; after `timeout` seconds fail the test, saying `what`
    it waited for, rather than hang CI."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout} s for {what}")
        time.sleep(0.02)


def wait_for_exit(job, timeout, log):
    """The exit status of a job started with Popen; fails the test with the end of its `log`
    if it runs past `timeout` seconds (the caller kills it)."""
    try:
        return job.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {timeout} s; the end of {log}:\n"
                    f"{open(log).read()[-3000:]}")


@pytest.fixture(scope="session")
def demo_csv():
    from support import demo_data
    return demo_data.ensure_demo_data()


@pytest.fixture(scope="session")
def demo_run(demo_csv, tmp_path_factory):
    """A tiny model trained for 80 steps on the demo data: a real run folder with checkpoints."""
    run_dir = tmp_path_factory.mktemp("demo_run")
    # `python train.py`, as the README's demo runs it.
    run_train("--max-steps", 80, "--batch-size", 64, "--workers", 0, "--output-dir", run_dir,
              env={"OMP_NUM_THREADS": "2"}, launcher="command")
    return run_dir


@pytest.fixture(scope="session")
def small_csv(demo_csv, tmp_path_factory):
    """48 demo pairs (3 steps per epoch at global batch 16), images left where they are."""
    import csv
    with open(demo_csv, newline="") as f:
        rows = list(csv.reader(f))
    path = tmp_path_factory.mktemp("small") / "pairs.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([rows[0]] + rows[1::len(rows) // 48][:48])
    return path


def start_small_run(small_csv, demo_csv, out, *flags, nproc=1, env=None, launcher=None):
    """A few steps of the tiny model on `small_csv`, started; finish_small_run waits for it."""
    job = start_train("--train-data", small_csv, "--image-root", os.path.dirname(demo_csv),
                      "--output-dir", out, "--workers", 0, *flags, nproc=nproc, env=env,
                      launcher=launcher)
    return job, out


def finish_small_run(started):
    """The final checkpoint of a run of start_small_run."""
    job, out = started
    finish_train(job)
    return torch.load(os.path.join(out, "checkpoints", "latest.pt"), weights_only=True)


def small_run(small_csv, demo_csv, out, *flags, nproc=1, env=None, launcher=None):
    """A few steps of the tiny model on `small_csv`; returns the final checkpoint."""
    return finish_small_run(start_small_run(small_csv, demo_csv, out, *flags, nproc=nproc,
                                            env=env, launcher=launcher))


# Each step saved and logged.
STEPS = ["--batch-size", 8, "--max-steps", 8, "--save-every", 1, "--log-every", 1]


@pytest.fixture(scope="session")
def uninterrupted(small_csv, demo_csv, tmp_path_factory):
    """8 steps on 2 ranks, never interrupted, with STEPS: the run folder and the final checkpoint
    that interrupted and repeated runs must equal. Under torchrun, as the killed runs are."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    return run_dir, small_run(small_csv, demo_csv, run_dir, *STEPS, nproc=2, launcher="command")


def export_hf(checkpoint, out_dir):
    """`python model.py --export-hf CHECKPOINT OUT_DIR`, in this process."""
    import model
    model.main(["--export-hf", checkpoint, out_dir])
