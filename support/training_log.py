"""What the training loop writes and watches: log.jsonl with the progress bar, and the check for
a non-finite loss or gradient that costs no synchronisation per step; and log.jsonl read back."""
import json
import os
import time

import torch
from tqdm import tqdm

from support.distributed import min_over_ranks
from support.errors import UsageError

class Log:
    """log.jsonl and the progress bar, both rank 0's; a `with` block closes the bar, so an error
    that stops the run prints on a line of its own."""

    def __init__(self, path, total_steps, start_step, is_main):
        self.path = path
        self.is_main = is_main
        self.progress = tqdm(total=total_steps, initial=start_step, disable=not is_main,
                             dynamic_ncols=True, mininterval=2)
        self.tick = time.time()
        self.postfix = {}

    def __enter__(self):
        return self

    def __exit__(self, *exception):
        self.progress.close()

    def write(self, record, samples):
        """`record` and samples_per_s, over the `samples` trained on since the last line."""
        record["samples_per_s"] = samples / (time.time() - self.tick)
        self.tick = time.time()
        self.append(record)
        self.show(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}")

    def write_zero_shot(self, step, accuracies, seconds):
        """A line of zero-shot accuracies after `step`; the seconds they took are not charged
        to the training's samples_per_s."""
        self.tick += seconds
        self.append({"step": step, "zero_shot": accuracies, "zero_shot_seconds": seconds})
        self.show(zero_shot="/".join(f"{accuracy:.2f}" for accuracy in accuracies.values()))

    def append(self, record):
        if self.is_main:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def show(self, **values):
        """Values on the progress line, beside the others shown so far."""
        self.postfix.update(values)
        self.progress.set_postfix(self.postfix)


class NonFiniteLoss:
    """Stops the run at a non-finite loss or gradient without a synchronisation per step.

    Each step's verdict stays on the device, folded into the first bad step; `check` reads it
    where the loop synchronises anyway, before a log line or a checkpoint, so a non-finite model
    is never saved. --skip-nonfinite N instead skips a bad step's update, which needs every rank's
    verdict at once: a synchronisation per step, paid only when asked.
    """

    def __init__(self, limit, total_steps, skipped, run_dir, device):
        self.limit = limit
        self.skipped = skipped  # the steps skipped so far; checkpoints keep them
        self.run_dir = run_dir
        self.none = total_steps + 1  # "no bad step yet"
        self.first_bad_step = torch.tensor(self.none, device=device)

    def skip(self, loss, gradient_norm, step):
        """Whether to skip the update of `step` (only with --skip-nonfinite)."""
        finite = torch.isfinite(loss) & torch.isfinite(gradient_norm)
        if self.limit and not min_over_ranks(finite):
            self.skipped.append(step)
            if len(self.skipped) > self.limit:
                raise UsageError(f"non-finite loss or gradient at steps {self.skipped}, more "
                                 f"than --skip-nonfinite {self.limit}; the last good checkpoint "
                                 f"is kept in {self.run_dir}/checkpoints.")
            return True
        bad_step = torch.where(finite, self.none, step)
        self.first_bad_step = torch.minimum(self.first_bad_step, bad_step)
        return False

    def check(self):
        """Raise if the loss was not finite on any rank at any step so far: a synchronisation."""
        first = min_over_ranks(self.first_bad_step).item()
        if first != self.none:
            raise UsageError(f"the loss or its gradient was not finite at step {first}; the last "
                             f"good checkpoint is kept in {self.run_dir}/checkpoints. Lower --lr, "
                             "set --grad-clip-norm, or pass --skip-nonfinite N.")


def read_log(path):
    """The records of a log.jsonl, in order ([] where there is none): training lines and
    zero-shot lines (those with "zero_shot"). A line that is no record is refused in one line."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            try:
                record = json.loads(line)
                record["step"]  # every line of train.py's has one
            except (ValueError, KeyError, TypeError):
                raise UsageError(f"{path}: line {number} is not a log record of train.py. "
                                 "Restore the file from a copy of the run folder.")
            records.append(record)
    return records
