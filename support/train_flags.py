"""train.py's flags, OpenCLIP's names where OpenCLIP has the setting, each default with its
reason; the checks that refuse a value that cannot work before anything runs; and which flags a
resume may change (RULE 8), the rest being taken from the checkpoint."""
import argparse
import os

from data import RRC_RATIO
from support.errors import UsageError

def add_data_flags(add):
    """The training data: where it is, which rows train, how images are read and cropped."""
    add("--train-data", help="CSV/TSV of image paths and captions (default: the demo dataset)")
    add("--image-root",
        help="folder the CSV's image paths are relative to (default: the CSV's folder)")
    add("--csv-img-key", default="image_path", help="image path column (QUILT-1M's name)")
    add("--csv-caption-key", default="caption", help="caption column")
    add("--csv-separator", help="default: tab for .tsv, comma otherwise")
    add("--csv-split-key",
        help="column naming each row's split (default: 'split', QUILT-1M's, where the CSV has "
             "it; else every row is used); a column given here must exist")
    add("--train-split", default="train",
        help="train only on rows whose --csv-split-key is this value; 'all': every row")
    add("--workers", type=int, default=2,
        help="data-loader processes per rank (results do not depend on it)")
    add("--rrc-scale", type=float, default=0.8,
        help="RandomResizedCrop lower scale; RULE 5: 0.7-0.8")
    add("--rrc-ratio", type=float, nargs=2, default=list(RRC_RATIO), metavar=("LO", "HI"),
        help="RandomResizedCrop's range of crop aspects (width/height); see the fallback share "
             "printed at start: 16:9 frames need a wider range or a lower --rrc-scale")
    add("--bad-samples", choices=["error", "skip"], default="error",
        help="an unreadable image or empty caption stops the run (error) "
             "or is left out, decided before training (skip)")
    add("--check-data", action="store_true",
        help="read every image once before training and list the bad rows")
    add("--max-image-pixels", type=int, default=89_478_485,
        help="refuse larger images (decompression bombs)")
    add("--allow-absolute-paths", action="store_true",
        help="let CSV image paths leave --image-root")
    add("--jpeg-draft", action="store_true",
        help="decode large JPEGs at a reduced scale: a faster loader, other pixels")


def key_value(text):
    """The argparse type of NAME=PATH flags (train.py's --zeroshot-data, evaluate.py's)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected NAME=PATH, e.g. lc25000_colon=/data/lung_colon_image_set")
    return key, value


def make_parser():
    # allow_abbrev=False: a shortened flag in a script (--max-step) is an error, not whatever
    # flag it happens to prefix today.
    parser = argparse.ArgumentParser(description="Train CLIP on image-caption pairs with "
                                     "torchrun, reproducibly.", allow_abbrev=False)
    add = parser.add_argument
    add_data_flags(add)
    add("--model", default="tiny",
        help="tiny, ViT-B-32, ViT-B-16, or an OpenCLIP model-config JSON")
    add("--tokenizer", help="local HF tokenizer folder (default: train a BPE on the captions)")
    add("--pretrained",
        help="start from these weights: ours, OpenAI, OpenCLIP or a HF CLIPModel folder")
    add("--activation", choices=["quick_gelu", "gelu"],
        help="--pretrained's activation (default: its config's; none there: QuickGELU, noted)")
    add("--batch-size", type=int, default=64,
        help="per process; global batch = this x world size x accum-steps")
    add("--accum-steps", type=int, default=1,
        help="micro-batches per step, with the contrastive loss over all")
    add("--epochs", type=int, default=16, help="the demo default: a few minutes on 2 CPU cores")
    add("--max-steps", type=int, help="stop after this many optimizer steps")
    add("--stop-at-step", type=int,
        help="end this invocation after step N, saving a checkpoint; continue with --resume "
             "(the run, its schedule included, stays the same)")
    add("--lr", type=float, default=5e-4,
        help="OpenCLIP's ViT default; RULE 6: stay at or above 5e-5")
    add("--wd", type=float, default=0.2,
        help="AdamW weight decay, not applied to gains, biases, logit_scale")
    add("--warmup", type=int,
        help="linear warm-up steps (default: 10%% of the run, at most 10000)")
    add("--beta1", type=float, default=0.9)
    add("--beta2", type=float, default=0.98)
    add("--eps", type=float, default=1e-6)
    add("--grad-clip-norm", type=float)
    add("--precision", choices=["fp32", "bf16"],
        help="bf16 = autocast, weights stay fp32 "
             "(default: bf16 where the hardware has it natively, else fp32)")
    add("--seed", type=int, default=0)
    # RULE 4: the global loss with gradient through the gather by default: the exact gradient.
    add("--local-loss", action=argparse.BooleanOptionalAction, default=False)
    add("--gather-with-grad", action=argparse.BooleanOptionalAction, default=True)
    add("--deterministic", action=argparse.BooleanOptionalAction, default=True,
        help="deterministic kernels (RULE 7); --no-deterministic trades them for speed")
    add("--grad-checkpointing", action="store_true",
        help="recompute activations in backward to save memory")
    add("--output-dir", help="run folder (default: runs/<model>-seed<seed>-<time>)")
    add("--save-every", type=int, help="checkpoint every N steps (default: once per epoch)")
    add("--log-every", type=int, default=10)
    add("--resume", help="'auto' (newest valid checkpoint in --output-dir) or a checkpoint path")
    add("--compile", action="store_true",
        help="torch.compile the model (see docs/performance.md for what it gains)")
    add("--reduction", choices=["tree", "ddp"], default="tree",
        help="tree: RULE 3's bitwise sum of the gradients where the guarantee is bitwise (DDP's "
             "all-reduce elsewhere); ddp: DDP's all-reduce always, faster across nodes, the "
             "guarantee then float rounding (docs/performance.md)")
    add("--dist-timeout", type=float, default=60,
        help="minutes a collective may wait before the run stops with an error: long enough "
             "for rank 0's start-up alone (a BPE on a million captions, --check-data)")
    add("--skip-nonfinite", type=int, default=0,
        help="skip up to N steps whose loss or gradient is not finite, instead of stopping")
    add("--zeroshot-every", type=int, default=0, metavar="N",
        help="score zero-shot accuracy every N steps and at the end, into log.jsonl (0: off); "
             "it changes no bit of the training")
    add("--zeroshot-data", action="append", default=[], type=key_value, metavar="TASK=PATH",
        help="repeatable, as evaluate.py's --dataset (default: the demo's held-out sets)")
    return parser


def parse_args(argv=None):
    args = make_parser().parse_args(argv)
    check_flags(args)
    return args


def given_flags(argv=None):
    """The flags the command line gives (their argparse names), whatever their values: those a
    resume compares with the checkpoint's, where every other flag is taken from it."""
    parser = make_parser()
    for action in parser._actions:  # argparse's list of them; no public way to reach the defaults
        action.default = argparse.SUPPRESS  # an absent flag stays absent
    return set(vars(parser.parse_args(argv)))


# A resume continues the run its checkpoint recorded. It takes every flag from there; one given
# again must have the recorded value, except these, which cannot change the bits (RULES.md, 8):
MAY_CHANGE_ON_RESUME = {
    "workers": "loader processes: never a result (RULE 2)",
    "check_data": "only lists bad rows; --bad-samples decides what trains",
    "output_dir": "where the run is continued",
    "resume": "which checkpoint",
    "save_every": "checkpoint cadence",
    "log_every": "log cadence",
    "accum_steps": "processes x accumulation, at the same global batch (RULE 3)",
    "train_data": "where the CSV is; its sha256 must match",
    "image_root": "where the images are",
    "zeroshot_every": "scores the model, changes no bit of it (tests/test_reproducibility.py)",
    "zeroshot_data": "what --zeroshot-every scores",
    "dist_timeout": "how long a collective may wait",
    "stop_at_step": "where this invocation ends; the schedule stays the run's",
}
# Flags of one invocation alone, which a resume does not take from the checkpoint: a run stopped
# with --stop-at-step N and resumed goes on past N; --dist-timeout is in force (the process
# group's) before the checkpoint is read, so the resume records the value it waits for.
NOT_CONTINUED = {"stop_at_step", "dist_timeout"}
MUST_MATCH_ON_RESUME = [
    "csv_img_key", "csv_caption_key", "csv_separator", "csv_split_key", "train_split",
    "rrc_scale", "rrc_ratio", "bad_samples", "max_image_pixels", "allow_absolute_paths",
    "jpeg_draft", "model", "tokenizer", "pretrained", "activation", "batch_size", "epochs",
    "max_steps", "lr", "wd", "warmup", "beta1", "beta2", "eps", "grad_clip_norm", "precision",
    "seed", "local_loss", "gather_with_grad", "deterministic", "grad_checkpointing", "compile",
    "skip_nonfinite", "reduction",
]


def flag_name(name):
    return "--" + name.replace("_", "-")


def continue_recorded_run(args, given, recorded, checkpoint):
    """`args` as the checkpoint's run recorded them (`recorded`: its args), but for the flags
    of MAY_CHANGE_ON_RESUME given on this command line; a result-changing flag given with
    another value than recorded is refused in one line."""
    # RULE 8: what is resumed is what was started; only what cannot change the bits may differ.
    for name in MUST_MATCH_ON_RESUME:
        if name in given and name in recorded and getattr(args, name) != recorded[name]:
            raise UsageError(
                f"--resume {checkpoint}: {flag_name(name)} {recorded[name]!r} there, "
                f"{getattr(args, name)!r} here, which would change the result. Leave "
                f"{flag_name(name)} out to continue the run, or start a new --output-dir.")
    for name, value in recorded.items():
        if hasattr(args, name) and name not in given and name not in NOT_CONTINUED:
            setattr(args, name, value)
    folder = os.path.dirname(os.path.abspath(checkpoint))
    if "output_dir" not in given and os.path.basename(folder) == "checkpoints":
        # RUN/checkpoints/step_N.pt continues RUN where it is now, not where it was recorded
        # (a copied or moved run, or a relative path typed in another folder).
        args.output_dir = os.path.dirname(folder)
    return args


def check_flags(args):
    """Refuse, in one line, a flag value that cannot work; warn about those the study advises
    against."""
    checks = [
        (args.batch_size >= 1, "--batch-size must be at least 1"),
        (args.accum_steps >= 1, "--accum-steps must be at least 1"),
        (args.epochs >= 1, "--epochs must be at least 1"),
        (args.max_steps is None or args.max_steps >= 1, "--max-steps must be at least 1"),
        (args.stop_at_step is None or args.stop_at_step >= 1,
         "--stop-at-step must be at least 1"),
        (0 < args.rrc_scale <= 1, "--rrc-scale must lie in (0, 1]"),
        (0 < args.rrc_ratio[0] <= args.rrc_ratio[1], "--rrc-ratio LO HI needs 0 < LO <= HI"),
        (args.lr > 0, "--lr must be positive"),
        (args.workers >= 0, "--workers cannot be negative"),
        (args.zeroshot_every >= 0, "--zeroshot-every cannot be negative"),
        (args.dist_timeout > 0, "--dist-timeout must be positive"),
        (args.resume != "auto" or args.output_dir,
         "--resume auto needs the --output-dir of the run"),
        (args.pretrained or not args.activation, "--activation applies to --pretrained weights; "
         "for --model, set quick_gelu in an OpenCLIP model-config JSON"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(f"{message}.")
    # RULE 6: a warning, not an error: fine-tuning may still want a smaller learning rate.
    if args.lr < 5e-5:
        print(f"warning: --lr {args.lr} is below 5e-5, which the study found degrades every "
              "dataset (RULE 6).")
    if args.local_loss and not args.gather_with_grad:
        print("warning: --local-loss without --gather-with-grad optimises a biased objective "
              "(see contrastive_loss).")


def image_root(args):
    """The folder the CSV's image paths are relative to: --image-root, else the CSV's own."""
    return args.image_root or os.path.dirname(os.path.abspath(args.train_data))
