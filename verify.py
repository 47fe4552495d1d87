"""Check a run: does it reproduce here, and why do two runs differ? It reads run folders and
never writes into them.

    python verify.py RUN                       # replay its last saved interval here, compare
    python verify.py RUN --from-step 40 --to-step 60 --nproc 1
    python verify.py RUN_A RUN_B               # what differs between two runs, and why

With one run folder it re-runs the interval between two saved checkpoints (the last two by
default) with the recorded flags, data and tokenizer: train.py as a real job in a temporary
folder, on the recorded number of processes or on --nproc N with the accumulation that keeps the
global batch (RULE 3). Weights, optimizer moments and the interval's logged loss, lr and
logit_scale are compared to the bit with the later checkpoint and RUN/log.jsonl; the recorded
facts that differ on this machine (RULE 9: libraries, device, threads, split, code, data,
tokenizer, images) are listed, the likeliest cause first. Exit status 0: bit-identical here;
1: differs; 2: a usage error (one line).

With two it prints what differs in their manifests, compares their checkpoints at common steps
and their losses at common logged steps, and says: the same bits, the same configuration but
other bits (with the likeliest cause), or another configuration (naming the flags). Exit status
0 for the same bits, else 1.
"""
import argparse
import sys

from support.compare_runs import explain_runs
from support.errors import UsageError, run_main
from support.replay import verify_run


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Check a run: replay an interval here (one run folder), or explain how two "
                    "runs differ (two).", allow_abbrev=False)
    add = parser.add_argument
    add("runs", nargs="+", metavar="RUN", help="one run folder to verify, or two to compare")
    add("--from-step", type=int, help="the saved step to replay from (default: the one before "
        "--to-step)")
    add("--to-step", type=int, help="the saved step to replay to (default: the last saved)")
    add("--nproc", type=int, help="processes for the replay (default: as recorded); "
        "--accum-steps follows, so that the global batch is the recorded one")
    add("--train-data", help="the training CSV, if it moved since the run (its sha256 must "
        "match)")
    add("--image-root", help="the image folder, if it moved since the run")
    args = parser.parse_args(argv)
    replay_flags = [args.from_step, args.to_step, args.nproc, args.train_data, args.image_root]
    if len(args.runs) > 2:
        raise UsageError(f"{len(args.runs)} run folders given: pass one to verify, or two to "
                         "compare.")
    if len(args.runs) == 2 and any(flag is not None for flag in replay_flags):
        raise UsageError("--from-step, --to-step, --nproc, --train-data and --image-root "
                         "replay one run; two runs are compared as they are.")
    return args


def main(argv=None):
    args = parse_args(argv)
    if len(args.runs) == 2:
        return explain_runs(*args.runs)
    return verify_run(args.runs[0], args.from_step, args.to_step, args.nproc, args.train_data,
                      args.image_root)


if __name__ == "__main__":
    sys.exit(run_main(main))
