"""Evaluate CLIP checkpoints on PatchCamelyon, LC25000-Lung and LC25000-Colon, zero-shot and by
linear probe, and summarise a multi-seed study: mean ± std over seeds per configuration, and
which differences one setting apart exceed the seeds' noise. It trains nothing.

    python evaluate.py --checkpoint runs/RUN/checkpoints/latest.pt
    python evaluate.py --checkpoint CKPT --dataset lc25000_colon=/data/lung_colon_image_set \
        --dataset pcam=/data/pcam
    python evaluate.py --runs runs/seed0 runs/seed1 runs/seed2 --figure results.png

Zero-shot and the probe score the same test images: PCam's official test split, else a seeded,
stratified half of each class. The probe's L2 strength is chosen on PCam's valid split, else on a
seeded, stratified slice of the training part; the seed and per-class counts go into the results.
"""
import argparse
import hashlib
import os
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

import data
from model import CLIP
from support import demo_data, image_sets
from support.errors import UsageError, run_main
from support.files import (atomic_write, check_output, checkpoint_sha256, read_json,
                           write_json)
from support.image_sets import LC25000_NOTE
from support.pretrained import run_tokenizer_folder
from support.study import (comparisons, draw_figure, finished_runs, group_runs,
                           print_comparisons, print_table, study, write_results)
from support.train_flags import key_value

# The Quilt-1M evaluation's class names and prompt templates. Keys are the released folder names (or
# PCam's label values): the mapping to class names is explicit, never by sort order.
TASKS = {
    "pcam": {"0": "lymph node", "1": "lymph node containing metastatic tumor tissue"},
    "lc25000_lung": {"lung_aca": "lung adenocarcinoma", "lung_n": "benign lung",
                     "lung_scc": "lung squamous cell carcinoma"},
    "lc25000_colon": {"colon_aca": "colon adenocarcinoma", "colon_n": "benign colonic tissue"},
}
TEMPLATES = ["a histopathology slide showing {}.", "histopathology image of {}.",
             "pathology tissue showing {}.", "presence of {} tissue on image."]

TEST_FRACTION = 0.5    # of each class, where no test split is official (LC25000, image folders)
VALID_FRACTION = 0.2   # of each class of the training part, where no valid split is official
WEIGHT_DECAYS = [1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6]  # the probe's L2 strengths, strongest first
# --runs' results without --output: in the current folder, not among the runs, so that a later
# `--runs runs/*` finds run folders alone there. Its absolute path is printed.
STUDY_OUTPUT = "results.json"


# ----------------------------------------------------------------------------- splits and features

def stratified_split(labels, fraction, seed):
    """(kept, held-out) sorted indices: round(fraction x class size) of every class held out."""
    generator = torch.Generator().manual_seed(seed)
    held = torch.zeros(len(labels), dtype=torch.bool)
    for label in labels.unique().tolist():
        members = (labels == label).nonzero().flatten()
        chosen = torch.randperm(len(members), generator=generator)[:round(fraction * len(members))]
        held[members[chosen]] = True
    return (~held).nonzero().flatten(), held.nonzero().flatten()


def benchmark_splits(task, root, folders, split="test", seed=0, transform=None):
    """{"train", "valid", "test": (dataset, indices)}, and a record of how they were made. A
    validation set carved from the training part is left out of "train"; record["refit"] says so."""
    if task == "pcam":
        test = image_sets.PcamDataset(root, split, transform)
        train = image_sets.PcamDataset(root, "train", transform)
        test_indices = torch.arange(len(test))
        train_indices = torch.arange(len(train))
        record = {"test": f"official {split} split", "train": "official train split"}
    else:
        test = train = image_sets.load_dataset(task, root, folders, transform=transform)
        train_indices, test_indices = stratified_split(test.labels, TEST_FRACTION, seed)
        record = {"test": f"seeded stratified {TEST_FRACTION:.0%} of each class",
                  "train": "the rest"}
    valid_labels = os.path.join(root, "camelyonpatch_level_2_split_valid_y.h5")
    if task == "pcam" and split != "valid" and os.path.isfile(valid_labels):
        valid = image_sets.PcamDataset(root, "valid", transform)
        valid_indices = torch.arange(len(valid))
        record.update(valid="official valid split", refit=False)
    else:  # RULE 1: seeded everywhere, the evaluation's splits too
        kept, held = stratified_split(train.labels[train_indices], VALID_FRACTION, seed)
        valid = train
        valid_indices = train_indices[held]
        train_indices = train_indices[kept]
        record.update(valid=f"seeded stratified {VALID_FRACTION:.0%} of each class of train",
                      refit=True)
    parts = {"train": (train, train_indices), "valid": (valid, valid_indices),
             "test": (test, test_indices)}
    record["seed"] = seed
    record["per_class"] = {name: torch.bincount(ds.labels[idx], minlength=len(folders)).tolist()
                           for name, (ds, idx) in parts.items()}
    if task in image_sets.LC25000_SUBFOLDER:
        record["note"] = LC25000_NOTE
    return parts, record


@torch.no_grad()
def encode_images(model, dataset, device, batch_size=256, workers=2):
    """L2-normalised image features (N, D) and labels (N,), in the dataset's order."""
    model.eval()
    on_gpu = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_gpu)  # CPUs stay fp32
    # Its own generator: iterating a DataLoader draws a seed from the global one otherwise, and
    # scoring while training must not touch the run's random state.
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, pin_memory=on_gpu,
                        generator=torch.Generator())
    features = []
    labels = []
    for images, targets in tqdm(loader, desc="encoding images", leave=False, mininterval=2):
        with autocast:
            batch = model.encode_image(images.to(device, non_blocking=True))  # (B, embed_dim)
        features.append(F.normalize(batch.float(), dim=-1).cpu())
        labels.append(targets)
    return torch.cat(features), torch.cat(labels)


def cached_features(model, dataset, device, checkpoint_sha256, cache_dir, batch_size, workers):
    """encode_images, kept on disk per (checkpoint, dataset fingerprint, device type): the probe's
    sweep and every later evaluation of the same checkpoint reuse the features."""
    name = f"{checkpoint_sha256[:16]}_{dataset.fingerprint[:16]}_{device.type}.pt"
    path = os.path.join(cache_dir, name)
    if os.path.isfile(path):
        cached = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle code
        if torch.equal(cached["labels"], dataset.labels):
            return cached["features"], cached["labels"]
    features, labels = encode_images(model, dataset, device, batch_size, workers)
    cache = {"features": features, "labels": labels}
    atomic_write(path, lambda tmp: torch.save(cache, tmp))
    return features, labels


# ----------------------------------------------------------------------------- zero-shot

@torch.no_grad()
def zero_shot_classifier(model, tokenizer, classnames, device):
    """(D, C): per class, the mean of its normalised template embeddings, renormalised."""
    weights = []
    for name in classnames:
        prompts = [template.format(name) for template in TEMPLATES]
        tokens = data.tokenize(tokenizer, prompts, model.config.context_length)
        embeddings = F.normalize(model.encode_text(tokens.to(device)).float(), dim=-1)
        weights.append(F.normalize(embeddings.mean(0), dim=-1))
    return torch.stack(weights, dim=1).cpu()


def classification_metrics(labels, predictions, num_classes):
    """Accuracy, balanced accuracy (mean recall over the classes present), support-weighted F1,
    per-class recall and the confusion matrix (rows: truth, columns: prediction)."""
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    confusion.index_put_((labels, predictions), torch.ones_like(labels), accumulate=True)
    support = confusion.sum(1).double()
    predicted = confusion.sum(0).double()
    true_positive = confusion.diag().double()
    recall = true_positive / support.clamp(min=1)
    f1 = 2 * true_positive / (support + predicted).clamp(min=1)  # = 2PR / (P + R); 0 if P + R = 0
    return {"accuracy": (true_positive.sum() / support.sum()).item(),
            "balanced_accuracy": recall[support > 0].mean().item(),
            "weighted_f1": ((f1 * support).sum() / support.sum()).item(),
            "per_class_recall": recall.tolist(), "confusion_matrix": confusion.tolist()}


def zero_shot(model, tokenizer, classnames, features, labels, device):
    classifier = zero_shot_classifier(model, tokenizer, classnames, device)  # (D, C)
    return classification_metrics(labels, (features @ classifier).argmax(1), len(classnames))


def zero_shot_sets(datasets, image_size):
    """[(task, its test images, its class names)] of {task: folder}: what zero-shot scores, read
    once, so that scoring while training (train.py --zeroshot-every) reads no layout again."""
    sets = []
    for task, root in datasets.items():
        if task not in TASKS:
            raise UsageError(f"--zeroshot-data {task}={root}: unknown task; choose from "
                             f"{', '.join(TASKS)}.")
        parts, _ = benchmark_splits(task, root, TASKS[task],
                                    transform=data.eval_transform(image_size))
        test, indices = parts["test"]  # the test images only
        sets.append((task, Subset(test, indices.tolist()), list(TASKS[task].values())))
    return sets


def zero_shot_accuracies(model, tokenizer, sets, device):
    """{task: zero-shot accuracy} on zero_shot_sets. The model is left in eval mode."""
    results = {}
    for task, images, classnames in sets:
        features, labels = encode_images(model, images, device, workers=0)
        scores = zero_shot(model, tokenizer, classnames, features, labels, device)
        results[task] = scores["accuracy"]
    return results


def zero_shot_scorer(model, tokenizer, datasets, device):
    """For train.py --zeroshot-every: a function () -> ({task: accuracy}, seconds) on the test
    images of {task: folder} (the demo's where empty). It reads the model and no random state;
    train.py calls it on rank 0 alone, and the other ranks wait at the next step's collectives,
    as for any slower rank: no bit of the training changes."""
    sets = zero_shot_sets(datasets or demo_data.demo_datasets(), model.config.image_size)

    def score():
        started = time.perf_counter()
        accuracies = zero_shot_accuracies(model, tokenizer, sets, device)
        model.train()
        return accuracies, round(time.perf_counter() - started, 3)
    return score


def demo_zero_shot(model, tokenizer, device):
    """Zero-shot accuracy on the demo's test images, printed and returned."""
    sets = zero_shot_sets(demo_data.demo_datasets(), model.config.image_size)
    results = zero_shot_accuracies(model, tokenizer, sets, device)
    for task, _, classnames in sets:
        print(f"demo zero-shot {task:14s} accuracy {results[task]:.3f} "
              f"(chance {1 / len(classnames):.3f})")
    return results


# ----------------------------------------------------------------------------- linear probe

def fit_logistic_regression(features, labels, num_classes, weight_decay):
    """Multinomial logistic regression minimising mean cross-entropy + weight_decay / 2 x |W|^2
    (bias free) by full-batch L-BFGS from zero in float64: no sampling, no random start."""
    x = features.double()                                                  # (N, D)
    weight = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, device=x.device,
                         requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, device=x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=300, history_size=20,
                                  tolerance_grad=1e-9, tolerance_change=1e-12,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        penalty = weight_decay / 2 * weight.pow(2).sum()
        loss = F.cross_entropy(x @ weight + bias, labels) + penalty
        loss.backward()
        return loss
    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


def linear_probe(train, valid, test, num_classes, refit, device):
    """Choose the L2 strength by validation cross-entropy (on a few hundred images accuracy ties
    between strengths, cross-entropy almost never), then score `test`; each split is (features,
    labels). With refit the final probe also learns from `valid`, borrowed from training."""
    def fit(split, weight_decay):
        features, labels = split
        return fit_logistic_regression(features.to(device), labels.to(device), num_classes,
                                       weight_decay)

    def logits(probe, features):                                           # (N, C)
        weight, bias = probe
        return (features.to(device).double() @ weight + bias).cpu()
    losses = {}
    for weight_decay in WEIGHT_DECAYS:
        probe = fit(train, weight_decay)
        losses[weight_decay] = F.cross_entropy(logits(probe, valid[0]), valid[1]).item()
    best = min(WEIGHT_DECAYS, key=losses.get)  # on a tie, the first: the stronger regularisation
    final = train
    if refit:
        final = (torch.cat([train[0], valid[0]]), torch.cat([train[1], valid[1]]))
    predictions = logits(fit(final, best), test[0]).argmax(1)
    metrics = classification_metrics(test[1], predictions, num_classes)
    return {**metrics, "weight_decay": best,
            "validation_cross_entropy": {str(k): v for k, v in losses.items()}}


# ----------------------------------------------------------------------------- checkpoints


def evaluate_checkpoint(checkpoint, request, datasets, tasks, args):
    """Zero-shot and linear probe of one checkpoint on every dataset: a JSON-ready dict."""
    device = torch.device(args.device)
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(checkpoint)))
    cache_dir = args.cache_dir or os.path.join(run_dir, "eval_cache")
    model = CLIP.from_pretrained(checkpoint, args.activation).to(device)
    tokenizer_dir = args.tokenizer or run_tokenizer_folder(checkpoint)
    if not tokenizer_dir:
        raise UsageError(f"{checkpoint} is not in one of our run folders: pass --tokenizer DIR.")
    tokenizer = data.load_tokenizer(tokenizer_dir)
    result = {"checkpoint": os.path.abspath(checkpoint), **request,
              "tokenizer_sha256": data.tokenizer_fingerprint(tokenizer), "datasets": {}}
    transform = data.eval_transform(model.config.image_size)
    # The features depend on the activation too, which --activation may override.
    features_key = request["checkpoint_sha256"]
    if args.activation:
        features_key = hashlib.sha256(f"{features_key}/{args.activation}".encode()).hexdigest()
    for task, root in datasets.items():
        parts, record = benchmark_splits(task, root, tasks[task], args.split, args.split_seed,
                                         transform)
        xy = {}
        for name, (dataset, indices) in parts.items():  # a dataset in several parts: encoded once
            features, labels = cached_features(model, dataset, device, features_key, cache_dir,
                                               args.batch_size, args.workers)
            xy[name] = features[indices], labels[indices]
        classnames = list(tasks[task].values())
        probe = linear_probe(xy["train"], xy["valid"], xy["test"], len(classnames),
                             record["refit"], device)
        result["datasets"][task] = {
            "path": os.path.abspath(root), "classnames": classnames, "split": record,
            "zero_shot": zero_shot(model, tokenizer, classnames, *xy["test"], device),
            "linear_probe": probe}
    return result


# ----------------------------------------------------------------------------- flags and main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint",
                       help="a checkpoint file, e.g. runs/RUN/checkpoints/latest.pt")
    which.add_argument("--runs", nargs="+",
                       help="run folders: evaluate each one's latest.pt, summarise over seeds")
    a = p.add_argument
    a("--dataset", action="append", default=[], type=key_value, metavar="TASK=PATH",
      help=f"repeatable; TASK: {', '.join(TASKS)} or a name given to --classnames "
           "(default: the demo's)")
    a("--classnames", action="append", default=[], type=key_value, metavar="TASK=FILE.json",
      help="an image folder's subfolder -> class name, "
           'e.g. {"tum": "tumor", "norm": "normal tissue"}')
    a("--tokenizer", help="tokenizer folder (default: RUN/tokenizer next to the checkpoints)")
    a("--activation", choices=["quick_gelu", "gelu"],
      help="the checkpoint's activation (default: its config's; none there: QuickGELU, noted)")
    a("--split", choices=["test", "valid"], default="test",
      help="the PatchCamelyon split to score (default: test)")
    a("--split-seed", type=int, default=0,
      help="seed of the stratified splits carved where none is official (default: 0)")
    a("--output", help="JSON (default: CHECKPOINT.eval.json; with --runs, results.json in the "
      "current folder)")
    a("--figure", metavar="PNG", help="draw every configuration's and seed's scores here")
    a("--cache-dir", help="image features cache (default: RUN/eval_cache)")
    a("--batch-size", type=int, default=256, help="images per forward pass (default: 256)")
    a("--workers", type=int, default=min(8, os.cpu_count() or 1),
      help="data-loader processes (default: up to 8)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a("--device", default=device, help="default: cuda if there is one")
    return p.parse_args(argv)


def task_definitions(args):
    """TASKS plus the --classnames mappings; the datasets to score, from --dataset or the demo."""
    tasks = dict(TASKS)
    for task, path in args.classnames:
        tasks[task] = read_json(path, f"--classnames {task}")
    datasets = dict(args.dataset) or demo_data.demo_datasets()
    for task, root in datasets.items():
        if task not in tasks:
            raise UsageError(f"--dataset {task}={root}: unknown task; choose from "
                             f"{', '.join(TASKS)}, or map an image folder's subfolders to class "
                             f"names with --classnames {task}=FILE.json.")
    return tasks, datasets


def dataset_fingerprints(datasets, tasks, args):
    """{task: {part: fingerprint}}, which also reads every dataset's layout: run before any model
    is loaded, a wrong path fails in a second, not in an hour."""
    fingerprints = {}
    for task, root in datasets.items():
        parts, _ = benchmark_splits(task, root, tasks[task], args.split, args.split_seed)
        fingerprints[task] = {name: dataset.fingerprint for name, (dataset, _) in parts.items()}
    return fingerprints


def stored_results(checkpoint):
    """Where a checkpoint's results are kept: RUN/checkpoints/latest.eval.json."""
    return os.path.splitext(os.path.normpath(checkpoint))[0] + ".eval.json"


def evaluate_or_reuse(run, checkpoint, request, datasets, tasks, args):
    """A run's stored results if made from these weights, images and protocol; else evaluated."""
    stored_path = stored_results(checkpoint)
    stored = {}
    if args.runs and os.path.isfile(stored_path):
        stored = read_json(stored_path, run)
    if all(stored.get(key) == value for key, value in request.items()):
        print(f"{run}: reusing {stored_path}")
        return stored
    result = evaluate_checkpoint(checkpoint, request, datasets, tasks, args)
    output = stored_path if args.runs else args.output or stored_path
    write_json(output, result)
    print(f"wrote {output}")
    return result


def check_outputs(args):
    """Refuse, before any work, a --output or --figure that could not be written: an evaluation
    can take an hour, and a typo in a path should cost a second."""
    if args.output:
        check_output(args.output, "--output")
    elif args.runs:
        check_output(STUDY_OUTPUT, "--output (default)")
    elif os.path.exists(args.checkpoint):  # a published model's folder may be read-only
        check_output(stored_results(args.checkpoint), "--output (default)")
    if args.figure:
        check_output(args.figure, "--figure")


def main(argv=None):
    args = parse_args(argv)
    check_outputs(args)
    tasks, datasets = task_definitions(args)
    fingerprints = dataset_fingerprints(datasets, tasks, args)
    protocol = {"split": args.split, "split_seed": args.split_seed, "test_fraction": TEST_FRACTION,
                "valid_fraction": VALID_FRACTION, "weight_decays": WEIGHT_DECAYS,
                "templates": TEMPLATES, "classnames": {task: tasks[task] for task in datasets},
                "tokenizer": args.tokenizer, "activation": args.activation}
    runs = [args.checkpoint]
    checkpoints = runs
    if args.runs:
        runs = finished_runs(args.runs)
        checkpoints = [os.path.join(run, "checkpoints", "latest.pt") for run in runs]
    elif not os.path.exists(args.checkpoint):
        raise UsageError(f"--checkpoint {args.checkpoint}: not found.")
    groups = [{"label": args.checkpoint, "runs": runs, "configuration": {}, "hardware": {}}]
    if args.runs:
        groups = group_runs(runs)
    results = {}
    for run, checkpoint in zip(runs, checkpoints):
        request = {"checkpoint_sha256": checkpoint_sha256(checkpoint),
                   "fingerprints": fingerprints, "protocol": protocol}
        results[run] = evaluate_or_reuse(run, checkpoint, request, datasets, tasks, args)
    configurations = study(groups, results)
    found = comparisons(configurations)
    print_table(configurations)
    print_comparisons(found)
    if args.runs:
        write_results(args.output or STUDY_OUTPUT, datasets, fingerprints, protocol,
                      configurations, found, results)
    if args.figure:
        draw_figure(configurations, found, args.figure)
        print(f"wrote the figure to {os.path.abspath(args.figure)}")
    return results


if __name__ == "__main__":
    run_main(main)
