"""The paper's study as a grid of runs: flag values x seeds, one line of train.py flags per run in
OUT_DIR/runs.txt, run one after another here or as a SLURM job array (OUT_DIR/slurm.sh); and the
curves of any runs from their log.jsonl. `python evaluate.py --runs OUT_DIR/*` then gives the
study's table, comparisons and figure.

    python grid.py write runs/rrc --vary rrc-scale=0.6,0.7,0.8,0.9 --seeds 0 1 2 \
        -- --model ViT-B-32 --train-data /data/quilt_256/quilt_1M_lookup.csv --zeroshot-every 500
    python grid.py run runs/rrc/runs.txt --nproc 8       # here, one run after another
    sbatch --nodes=4 runs/rrc/slurm.sh                    # on a SLURM cluster, one task per run
    python grid.py curves runs/rrc/* --figure curves.png
"""
import argparse
import sys

from support.curves import draw_curves
from support.errors import run_main
from support.files import check_output
from support.grid import parse_vary, run_locally, write_grid


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser("write", allow_abbrev=False,
                                help="expand a grid into OUT_DIR/runs.txt and OUT_DIR/slurm.sh")
    write.add_argument("out_dir", metavar="OUT_DIR", help="the study's folder of run folders")
    write.add_argument("--vary", action="append", default=[], type=parse_vary,
                       metavar="FLAG=V1,V2", help="repeatable: a train.py flag and its values")
    write.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                       help="RULE 10: at least three")
    write.add_argument("--gpus-per-node", type=int, default=8, help="for slurm.sh")
    run = commands.add_parser("run", allow_abbrev=False,
                              help="train every line of a runs.txt here, one after another")
    run.add_argument("runs", metavar="RUNS_TXT")
    run.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun)")
    curves = commands.add_parser("curves", allow_abbrev=False,
                                 help="loss, lr, temperature and zero-shot against the step")
    curves.add_argument("run_dirs", nargs="+", metavar="RUN")
    curves.add_argument("--figure", required=True, metavar="PNG")
    parser.epilog = "write: the train.py flags every run shares follow a lone --"
    return parser.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    common = []  # train.py's flags, after a lone --: not grid.py's to read
    if "--" in argv:
        common = argv[argv.index("--") + 1:]
        argv = argv[:argv.index("--")]
    args = parse_args(argv)
    if args.command == "write":
        runs, slurm = write_grid(args.out_dir, args.vary, args.seeds, common,
                                 args.gpus_per_node)
        print(f"wrote {runs} and {slurm}")
    elif args.command == "run":
        run_locally(args.runs, args.nproc)
    else:
        check_output(args.figure, "--figure")
        draw_curves(args.run_dirs, args.figure)
        print(f"wrote {args.figure}")


if __name__ == "__main__":
    run_main(main)
