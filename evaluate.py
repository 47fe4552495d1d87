"""Evaluate CLIP checkpoints on PatchCamelyon, LC25000-Lung and LC25000-Colon, zero-shot and by linear probe,
and summarise a multi-seed study as mean ± std over seeds for every training configuration. It trains nothing.
Datasets are read from local disk in their released layouts, never downloaded; with no --dataset the demo's
held-out sets from data.py are used, so everything runs offline out of the box.

    python evaluate.py --checkpoint runs/RUN/checkpoints/latest.pt
    python evaluate.py --checkpoint CKPT --dataset lc25000_colon=/data/lung_colon_image_set --dataset pcam=/data/pcam
    python evaluate.py --runs runs/seed0 runs/seed1 runs/seed2 --output results.json --figure results.png

Zero-shot and the probe score the same test images: PCam's official test split; for LC25000 and image folders
(no official split) a seeded, stratified half of each class. The probe's L2 strength is chosen on PCam's valid
split, or on a seeded, stratified 20% of the training part; the seed and per-class counts go into the results.
"""
import argparse
import hashlib
import json
import os
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

import data
import demo_data
import plumbing
from model import CLIP, run_tokenizer_folder
from plumbing import UsageError

# The Quilt-1M evaluation's class names and prompt templates. Keys are the released folder names (or
# PCam's label values): the mapping to class names is explicit, never by sort order.
TASKS = {
    "pcam": {"0": "lymph node", "1": "lymph node containing metastatic tumor tissue"},
    "lc25000_lung": {"lung_aca": "lung adenocarcinoma", "lung_n": "benign lung", "lung_scc": "lung squamous cell carcinoma"},
    "lc25000_colon": {"colon_aca": "colon adenocarcinoma", "colon_n": "benign colonic tissue"},
}
TEMPLATES = ["a histopathology slide showing {}.", "histopathology image of {}.",
             "pathology tissue showing {}.", "presence of {} tissue on image."]
LC25000_SUBFOLDER = {"lc25000_lung": "lung_image_sets", "lc25000_colon": "colon_image_sets"}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff")

TEST_FRACTION = 0.5    # of each class, where no test split is official (LC25000, image folders)
VALID_FRACTION = 0.2   # of each class of the training part, where no valid split is official
WEIGHT_DECAYS = [1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6]  # the probe's L2 strengths, strongest first
METRICS = ["accuracy", "balanced_accuracy", "weighted_f1"]
METHODS = {"zero_shot": "zero-shot", "linear_probe": "linear probe"}
HEADLINE = "balanced_accuracy"  # what "most reproducible" and the figure are judged on
# Flags that do not make another configuration: the seed, the run's own paths, and bookkeeping that cannot change
# a result (workers: RULE 2). Any other difference, e.g. rrc_scale 0.6 vs 0.8 or torch 2.3 vs 2.4, is another row.
NOT_CONFIGURATION = {"seed", "output_dir", "resume", "workers", "log_every", "save_every"}


# ----------------------------------------------------------------------------- datasets and their image features

def files_fingerprint(paths, parts):
    """sha256 of the sorted (last `parts` path components, size) list: cheap, blind to same-size rewrites in place."""
    listing = sorted(f"{os.path.join(*p.split(os.sep)[-parts:])}\t{os.path.getsize(p)}\n" for p in paths)
    return hashlib.sha256("".join(listing).encode()).hexdigest()

def lc25000_samples(task, root, folders=None):
    """[(image path, label)], label = the folder's position in `folders` (explicit, never sort order).
    LC25000 is found from its top folder or the task's subfolder; an image folder (--classnames) at root."""
    if task not in LC25000_SUBFOLDER and folders is None:
        raise UsageError(f"--dataset {task}={root}: unknown task; choose from {', '.join(TASKS)}, or map an image "
                         f"folder's subfolders to class names with --classnames {task}=FILE.json.")
    folders = folders or TASKS[task]
    bases = [os.path.join(root, LC25000_SUBFOLDER[task])] if task in LC25000_SUBFOLDER else []
    for base in bases + [root]:
        if all(os.path.isdir(os.path.join(base, name)) for name in folders):
            samples = [(os.path.join(base, name, file), label) for label, name in enumerate(folders)
                       for file in sorted(os.listdir(os.path.join(base, name)))
                       if file.lower().endswith(IMAGE_EXTENSIONS)]
            if empty := [name for label, name in enumerate(folders) if label not in {s[1] for s in samples}]:
                raise UsageError(f"{task}={root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in {', '.join(empty)}.")
            return samples
    layout = (f"lung_colon_image_set/{LC25000_SUBFOLDER[task]}/" if bases else "") + f"{{{','.join(folders)}}}/*.jpeg"
    raise UsageError(f"{task}={root}: expected the layout {layout}" + (" (the top folder or its subfolder)." if bases else "."))


class ImageListDataset(Dataset):
    """(image, label) pairs; with transform=None the images stay PIL images, as in torchvision."""

    def __init__(self, samples, transform=None):
        self.samples, self.transform = samples, transform
        self.labels = torch.tensor([label for _, label in samples])
        self.fingerprint = files_fingerprint([path for path, _ in samples], parts=2)  # class folder/file

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        image = data.load_rgb(self.samples[i][0])
        return (self.transform(image) if self.transform else image), self.samples[i][1]

class PcamDataset(Dataset):
    """PatchCamelyon's HDF5 files, read a patch at a time (the test split alone is 32,768 x 96 x 96 x 3)."""

    def __init__(self, root, split, transform=None):
        self.x_path, y_path = (os.path.join(root, f"camelyonpatch_level_2_split_{split}_{p}.h5") for p in "xy")
        try:  # only the labels are read now, one byte per patch
            with h5py.File(y_path, "r") as y_file, h5py.File(self.x_path, "r") as x_file:
                self.labels = torch.from_numpy(y_file["y"][:].reshape(-1).astype(np.int64))
                assert x_file["x"].shape[0] == len(self.labels), "as many patches as labels"
        except (OSError, KeyError, AssertionError) as e:
            reason = "a file is missing" if isinstance(e, FileNotFoundError) else f"{type(e).__name__}: {e}"
            raise UsageError(f"pcam={root}: cannot read the {split} split ({reason}); expected PatchCamelyon's "
                             "camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5 files (gunzipped).")
        self.transform, self.file, self.file_pid = transform, None, None
        self.fingerprint = files_fingerprint([self.x_path, y_path], parts=1)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        if self.file_pid != os.getpid():  # opened lazily, once per process: h5py handles do not survive fork
            self.file, self.file_pid = h5py.File(self.x_path, "r"), os.getpid()
        image = Image.fromarray(self.file["x"][i])                             # (96, 96, 3) uint8
        return (self.transform(image) if self.transform else image), int(self.labels[i])

def load_dataset(task, root, folders=None, split="test", transform=None):
    """One task's images from its released layout; `folders` (folder -> class name) for an image folder."""
    if task == "pcam":
        return PcamDataset(root, split, transform)
    return ImageListDataset(lc25000_samples(task, root, folders), transform)

def demo_datasets():
    root = os.path.dirname(demo_data.ensure_demo_data())
    return {"pcam": os.path.join(root, "pcam"), **dict.fromkeys(LC25000_SUBFOLDER, os.path.join(root, "lung_colon_image_set"))}

def stratified_split(labels, fraction, seed):
    """(kept, held-out) sorted indices: round(fraction x class size) of every class held out, seeded."""
    generator, held = torch.Generator().manual_seed(seed), torch.zeros(len(labels), dtype=torch.bool)
    for label in labels.unique().tolist():
        members = (labels == label).nonzero().flatten()
        held[members[torch.randperm(len(members), generator=generator)[:round(fraction * len(members))]]] = True
    return (~held).nonzero().flatten(), held.nonzero().flatten()

def benchmark_splits(task, root, folders, split="test", seed=0, transform=None):
    """{"train", "valid", "test": (dataset, indices)}, and a record of how they were made.
    A validation set carved from the training part is excluded from "train", and record["refit"] says so."""
    if task == "pcam":
        test, train = PcamDataset(root, split, transform), PcamDataset(root, "train", transform)
        test_indices, train_indices = torch.arange(len(test)), torch.arange(len(train))
        record = {"test": f"official {split} split", "train": "official train split"}
        has_valid = split != "valid" and os.path.isfile(os.path.join(root, "camelyonpatch_level_2_split_valid_y.h5"))
    else:
        test = train = load_dataset(task, root, folders, transform=transform)
        train_indices, test_indices = stratified_split(test.labels, TEST_FRACTION, seed)
        record, has_valid = {"test": f"seeded stratified {TEST_FRACTION:.0%} of each class", "train": "the rest"}, False
    if has_valid:
        valid = PcamDataset(root, "valid", transform)
        valid_indices, record["valid"], record["refit"] = torch.arange(len(valid)), "official valid split", False
    else:  # RULE 1: seeded everywhere, the evaluation's splits too
        kept, held = stratified_split(train.labels[train_indices], VALID_FRACTION, seed)
        valid, valid_indices, train_indices = train, train_indices[held], train_indices[kept]
        record["valid"], record["refit"] = f"seeded stratified {VALID_FRACTION:.0%} of each class of train", True
    parts = {"train": (train, train_indices), "valid": (valid, valid_indices), "test": (test, test_indices)}
    record["seed"], record["per_class"] = seed, {name: torch.bincount(ds.labels[idx], minlength=len(folders)).tolist()
                                                 for name, (ds, idx) in parts.items()}
    return parts, record

@torch.no_grad()
def encode_images(model, dataset, device, batch_size=256, workers=2):
    """L2-normalised image features (N, D) and labels (N,), in the dataset's order."""
    model.eval()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")  # CPUs stay fp32
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda")
    features, labels = [], []
    for images, targets in tqdm(loader, desc="encoding images", leave=False, mininterval=2):
        with autocast:
            batch = model.encode_image(images.to(device, non_blocking=True))   # (B, embed_dim)
        features.append(F.normalize(batch.float(), dim=-1).cpu())
        labels.append(targets)
    return torch.cat(features), torch.cat(labels)

def write_json(path, obj):
    plumbing.write_json(path, obj)
    print(f"wrote {path}")

def read_json(path, flag):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{flag}: cannot read {path} ({e}).")

def cached_features(model, dataset, device, checkpoint_sha256, cache_dir, batch_size, workers):
    """encode_images, kept on disk per (checkpoint sha256, dataset fingerprint, device type): the probe's
    sweep and every later evaluation of the same checkpoint reuse the features instead of re-encoding."""
    path = os.path.join(cache_dir, f"{checkpoint_sha256[:16]}_{dataset.fingerprint[:16]}_{device.type}.pt")
    if os.path.isfile(path):
        cached = torch.load(path, map_location="cpu", weights_only=True)  # tensors only: never unpickle code
        if torch.equal(cached["labels"], dataset.labels):
            return cached["features"], cached["labels"]
    features, labels = encode_images(model, dataset, device, batch_size, workers)
    plumbing.atomic_write(path, lambda tmp: torch.save({"features": features, "labels": labels}, tmp))
    return features, labels


# ----------------------------------------------------------------------------- zero-shot

@torch.no_grad()
def zero_shot_classifier(model, tokenizer, classnames, device):
    """(D, C): per class, the mean of its normalised template embeddings, renormalised."""
    weights = []
    for name in classnames:
        tokens = data.tokenize(tokenizer, [t.format(name) for t in TEMPLATES], model.config.context_length)
        embeddings = F.normalize(model.encode_text(tokens.to(device)).float(), dim=-1)
        weights.append(F.normalize(embeddings.mean(0), dim=-1))
    return torch.stack(weights, dim=1).cpu()

def classification_metrics(labels, predictions, num_classes):
    """Accuracy, balanced accuracy (mean recall over the classes present), support-weighted F1, per-class
    recall and the confusion matrix (rows: truth, columns: prediction)."""
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    confusion.index_put_((labels, predictions), torch.ones_like(labels), accumulate=True)
    support, predicted, true_positive = confusion.sum(1).double(), confusion.sum(0).double(), confusion.diag().double()
    recall = true_positive / support.clamp(min=1)
    f1 = 2 * true_positive / (support + predicted).clamp(min=1)  # = 2PR / (P + R), and 0 where P + R = 0
    return {"accuracy": (true_positive.sum() / support.sum()).item(),
            "balanced_accuracy": recall[support > 0].mean().item(),
            "weighted_f1": ((f1 * support).sum() / support.sum()).item(),
            "per_class_recall": recall.tolist(), "confusion_matrix": confusion.tolist()}

def zero_shot(model, tokenizer, classnames, features, labels, device):
    classifier = zero_shot_classifier(model, tokenizer, classnames, device)  # (D, C)
    return classification_metrics(labels, (features @ classifier).argmax(1), len(classnames))

def demo_zero_shot(model, tokenizer, device):
    """Zero-shot accuracy on the demo's test images, printed and returned."""
    results = {}
    for task, root in demo_datasets().items():
        parts, _ = benchmark_splits(task, root, TASKS[task], transform=data.eval_transform(model.config.image_size))
        test, indices = parts["test"]  # encode the test images only
        features, labels = encode_images(model, Subset(test, indices.tolist()), device, workers=0)
        results[task] = zero_shot(model, tokenizer, list(TASKS[task].values()), features, labels, device)["accuracy"]
        print(f"demo zero-shot {task:14s} accuracy {results[task]:.3f} (chance {1 / len(TASKS[task]):.3f})")
    return results


# ----------------------------------------------------------------------------- linear probe

def fit_logistic_regression(features, labels, num_classes, weight_decay, max_iter=300):
    """Multinomial logistic regression minimising mean cross-entropy + weight_decay / 2 x |W|^2 (the bias is
    free), by full-batch L-BFGS from zero in float64: no sampling and no random start, so it is deterministic."""
    x = features.double()                                                      # (N, D)
    weight = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, device=x.device, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, device=x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, history_size=20, tolerance_grad=1e-9,
                                  tolerance_change=1e-12, line_search_fn="strong_wolfe")
    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, labels) + weight_decay / 2 * weight.pow(2).sum()
        loss.backward()
        return loss
    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()

def linear_probe(train, valid, test, num_classes, refit, device):
    """Choose the L2 strength by validation cross-entropy (on a few hundred images accuracy ties between strengths;
    the cross-entropy almost never does), then score the test split. train, valid, test: (features, labels).
    With refit the final probe also learns from `valid`, which was only borrowed from the training split."""
    def fit(split, weight_decay):
        return fit_logistic_regression(split[0].to(device), split[1].to(device), num_classes, weight_decay)
    def logits(probe, features):                                               # (N, C)
        return (features.to(device).double() @ probe[0] + probe[1]).cpu()
    losses = {wd: F.cross_entropy(logits(fit(train, wd), valid[0]), valid[1]).item() for wd in WEIGHT_DECAYS}
    best = min(WEIGHT_DECAYS, key=losses.get)  # on a tie, the first: the stronger regularisation
    final = (torch.cat([train[0], valid[0]]), torch.cat([train[1], valid[1]])) if refit else train
    metrics = classification_metrics(test[1], logits(fit(final, best), test[0]).argmax(1), num_classes)
    return {**metrics, "weight_decay": best, "validation_cross_entropy": {str(k): v for k, v in losses.items()}}


# ----------------------------------------------------------------------------- checkpoints and the multi-seed study

def checkpoint_sha256(path):
    """plumbing.file_sha256 of a weights file; for a Hugging Face CLIPModel folder, a sha256 over its files' ones."""
    if os.path.isfile(path):
        return plumbing.file_sha256(path)
    files = sorted(os.path.relpath(os.path.join(d, f), path) for d, _, names in os.walk(path) for f in names)
    return hashlib.sha256("".join(f"{f}\t{plumbing.file_sha256(os.path.join(path, f))}\n" for f in files).encode()).hexdigest()

def evaluate_checkpoint(checkpoint, request, datasets, tasks, args):
    """Zero-shot and linear probe of one checkpoint on every dataset, as a JSON-ready dict headed by `request`."""
    device, run_dir = torch.device(args.device), os.path.dirname(os.path.dirname(os.path.abspath(checkpoint)))
    cache_dir, sha = args.cache_dir or os.path.join(run_dir, "eval_cache"), request["checkpoint_sha256"]
    model = CLIP.from_pretrained(checkpoint).to(device)
    tokenizer_dir = args.tokenizer or run_tokenizer_folder(checkpoint)
    if not tokenizer_dir:
        raise UsageError(f"{checkpoint} is not in one of our run folders: pass --tokenizer DIR.")
    tokenizer = data.load_tokenizer(tokenizer_dir)
    result = {"checkpoint": os.path.abspath(checkpoint), **request,
              "tokenizer_sha256": data.tokenizer_fingerprint(tokenizer), "datasets": {}}
    for task, root in datasets.items():
        parts, record = benchmark_splits(task, root, tasks[task], args.split, args.split_seed,
                                         data.eval_transform(model.config.image_size))
        xy = {}
        for name, (dataset, indices) in parts.items():  # a dataset serving several parts is encoded once
            features, labels = cached_features(model, dataset, device, sha, cache_dir, args.batch_size, args.workers)
            xy[name] = features[indices], labels[indices]
        classnames = list(tasks[task].values())
        result["datasets"][task] = {
            "path": os.path.abspath(root), "classnames": classnames, "split": record,
            "zero_shot": zero_shot(model, tokenizer, classnames, *xy["test"], device),
            "linear_probe": linear_probe(xy["train"], xy["valid"], xy["test"], len(classnames), record["refit"], device)}
    return result


def group_runs(runs):
    """[(label, [run, ...])] in first-seen order; a label names only what tells configurations apart ("rrc_scale=0.6")."""
    groups = {}
    for run in runs:
        manifest = read_json(os.path.join(run, "manifest.json"), f"--runs {run} (expected a run folder of train.py)")
        # RULE 12: one configuration = the same flags (but NOT_CONFIGURATION), training data and library versions.
        key = {k: v for k, v in manifest["args"].items() if k not in NOT_CONFIGURATION}
        key |= {"train_data_sha256": manifest.get("train_data", {}).get("sha256"),
                **{f"{library}_version": v for library, v in manifest.get("versions", {}).items()}}
        groups.setdefault(json.dumps(key, sort_keys=True), []).append(run)
    configurations = [json.loads(key) for key in groups]
    differing = sorted(k for k in set().union(*configurations) if len({json.dumps(c.get(k)) for c in configurations}) > 1)
    return [(", ".join(f"{k}={c.get(k)}" for k in differing) or "all runs", members)
            for c, members in zip(configurations, groups.values())]

def summarise(values):
    """Mean, sample standard deviation (ddof=1, the usual "± std over seeds"; undefined for one run), min, max."""
    v = np.asarray(values, dtype=np.float64)
    return {"n": len(v), "mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else None,  # RULE 10
            "min": float(v.min()), "max": float(v.max()), "values": v.tolist()}

def study(groups, results):
    """Per configuration: its runs, and the summary over seeds of every dataset x method x metric."""
    configurations = []
    for label, members in groups:
        summary = {task: {method: {metric: summarise([results[run]["datasets"][task][method][metric]
                                                      for run in members]) for metric in METRICS}
                          for method in METHODS} for task in results[members[0]]["datasets"]}
        stds = {task: s["zero_shot"][HEADLINE]["std"] for task, s in summary.items()}
        most = min(stds, key=stds.get) if len(members) > 1 else None  # RULE 11: the lowest std across seeds
        configurations.append({"label": label, "runs": members, "summary": summary, "most_reproducible":
                               most and {"dataset": most, "std": stds[most]}})
    return configurations

def print_table(configurations):
    """Per dataset, a row per configuration and method: one run's scores, or mean ± sample std (min–max) over seeds."""
    def cell(s):
        return f"{s['mean']:.3f}" if s["n"] == 1 else f"{s['mean']:.3f} ± {s['std']:.3f} ({s['min']:.3f}–{s['max']:.3f})"
    width = max(len(name) for name in [c["label"] for c in configurations] + list(configurations[0]["summary"])) + 2
    for task in configurations[0]["summary"]:
        print(f"\n{task:{width}s} seeds  {'method':13s} " + " ".join(f"{m:28s}" for m in METRICS))
        for c in configurations:
            for i, (method, title) in enumerate(METHODS.items()):
                head = f"{c['label']:{width}s} {len(c['runs']):5d}" if i == 0 else " " * (width + 6)
                print(f"{head}  {title:13s} " + " ".join(f"{cell(c['summary'][task][method][m]):28s}" for m in METRICS))
    for label, most in ((c["label"], c["most_reproducible"]) for c in configurations if c["most_reproducible"]):
        print(f"{label}: most reproducible benchmark {most['dataset']} (lowest std of zero-shot {HEADLINE}: {most['std']:.4f})")

def draw_figure(configurations, path):
    """A panel per method and dataset, a row per configuration: every seed's score as a dot, mean ± std as a bar."""
    from matplotlib.figure import Figure  # imported only when a figure is drawn; no display needed
    tasks, labels = list(configurations[0]["summary"]), [c["label"] for c in configurations]
    figure = Figure(figsize=(3 * len(tasks) + 0.07 * max(map(len, labels)), 1 + 0.7 * len(labels)), layout="constrained")
    axes = figure.subplots(len(METHODS), len(tasks), sharey=True, squeeze=False)
    for row, (method, title) in enumerate(METHODS.items()):
        for ax, task in zip(axes[row], tasks):
            for y, c in enumerate(configurations):
                s = c["summary"][task][method][HEADLINE]
                ax.scatter(s["values"], np.full(s["n"], y - 0.15), s=14, color="tab:blue", alpha=0.7)
                ax.errorbar(s["mean"], y + 0.15, xerr=s["std"] or 0, fmt="o", color="black", capsize=3)
            ax.set_title(f"{task}, {title}", fontsize=9)
    axes[0][0].set_yticks(range(len(labels)), labels)
    axes[0][0].invert_yaxis()  # the first configuration on top, as in the table
    figure.supxlabel(HEADLINE.replace("_", " "))
    figure.savefig(path, dpi=120)


# ----------------------------------------------------------------------------- flags and main

def key_value(text):  # the argparse type of NAME=PATH flags
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=PATH, e.g. lc25000_colon=/data/lung_colon_image_set")
    return key, value

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="a checkpoint file, e.g. runs/RUN/checkpoints/latest.pt")
    which.add_argument("--runs", nargs="+", help="run folders: evaluate each one's latest.pt, summarise over seeds")
    a = p.add_argument
    a("--dataset", action="append", default=[], type=key_value, metavar="TASK=PATH",
      help=f"repeatable; TASK: {', '.join(TASKS)} or a name given to --classnames (default: the demo's)")
    a("--classnames", action="append", default=[], type=key_value, metavar="TASK=FILE.json",
      help='an image folder\'s subfolder -> class name, e.g. {"tum": "tumor", "norm": "normal tissue"}')
    a("--tokenizer", default=None, help="tokenizer folder (default: RUN/tokenizer next to the checkpoints)")
    a("--split", choices=["test", "valid"], default="test", help="the PatchCamelyon split to score (default: test)")
    a("--split-seed", type=int, default=0, help="seed of the stratified splits carved where none is official (default: 0)")
    a("--output", default=None, help="JSON (default: CHECKPOINT.eval.json; results.json with --runs)")
    a("--figure", default=None, metavar="PNG", help="draw the scores of every configuration and seed into this file")
    a("--cache-dir", default=None, help="image features cache (default: RUN/eval_cache)")
    a("--batch-size", type=int, default=256, help="images per forward pass (default: 256)")
    a("--workers", type=int, default=min(8, os.cpu_count() or 1), help="data-loader processes (default: up to 8)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default: cuda if there is one")
    return p.parse_args(argv)

def task_definitions(args):
    """TASKS plus the --classnames mappings; and the datasets to score, from --dataset or the demo."""
    tasks = {**TASKS, **{task: read_json(path, f"--classnames {task}") for task, path in args.classnames}}
    return tasks, dict(args.dataset) or demo_datasets()

def main(argv=None):
    args = parse_args(argv)
    tasks, datasets = task_definitions(args)
    # Read every dataset's layout before loading any model: a wrong path fails in a second, not in an hour.
    fingerprints = {task: {name: ds.fingerprint for name, (ds, _) in benchmark_splits(
        task, root, tasks.get(task), args.split, args.split_seed)[0].items()} for task, root in datasets.items()}
    protocol = {"split": args.split, "split_seed": args.split_seed, "test_fraction": TEST_FRACTION,
                "valid_fraction": VALID_FRACTION, "weight_decays": WEIGHT_DECAYS, "templates": TEMPLATES,
                "classnames": {task: tasks[task] for task in datasets}, "tokenizer": args.tokenizer}
    runs = args.runs or [args.checkpoint]
    checkpoints = [os.path.join(run, "checkpoints", "latest.pt") for run in args.runs] if args.runs else runs
    for checkpoint in filter(lambda c: not os.path.exists(c), checkpoints):
        raise UsageError(f"{checkpoint}: not found" + ("; expected run folders of train.py." if args.runs else "."))
    groups, results = group_runs(args.runs) if args.runs else [(args.checkpoint, runs)], {}
    for run, checkpoint in zip(runs, checkpoints):
        stored_path = os.path.splitext(checkpoint)[0] + ".eval.json"  # RUN/checkpoints/latest.eval.json
        stored = read_json(stored_path, run) if args.runs and os.path.isfile(stored_path) else {}
        request = {"checkpoint_sha256": checkpoint_sha256(checkpoint), "fingerprints": fingerprints, "protocol": protocol}
        if all(stored.get(key) == value for key, value in request.items()):  # these weights, images and protocol
            print(f"{run}: reusing {stored_path}")
            results[run] = stored
        else:
            results[run] = evaluate_checkpoint(checkpoint, request, datasets, tasks, args)
            write_json(stored_path if args.runs else args.output or stored_path, results[run])
    configurations = study(groups, results)
    print_table(configurations)
    if args.runs:
        write_json(args.output or "results.json", {"std": "sample standard deviation over seeds (ddof=1)",
            "headline_metric": HEADLINE, "not_configuration": sorted(NOT_CONFIGURATION), "protocol": protocol,
            "datasets": {t: {"path": os.path.abspath(root), "fingerprints": fingerprints[t]} for t, root in datasets.items()},
            "configurations": configurations, "runs": results})
    if args.figure:
        draw_figure(configurations, args.figure)
    return results


if __name__ == "__main__":
    plumbing.run_main(main)
