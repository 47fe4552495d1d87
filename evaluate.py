"""Evaluate CLIP checkpoints zero-shot on PatchCamelyon, LC25000-Lung and LC25000-Colon.

Datasets are read from local disk in their released layouts (never downloaded); with no --dataset the
demo's held-out sets from data.py are used, so this runs offline out of the box.

    python evaluate.py --checkpoint runs/RUN/checkpoints/latest.pt
    python evaluate.py --checkpoint CKPT --dataset lc25000_colon=/data/lung_colon_image_set --dataset pcam=/data/pcam
"""
import argparse
import json
import os

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

import data

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
LC25000_SUBFOLDER = {"lc25000_lung": "lung_image_sets", "lc25000_colon": "colon_image_sets"}


# ----------------------------------------------------------------------------- datasets

def lc25000_samples(task, root):
    """[(jpeg path, label)] from the top folder `lung_colon_image_set/` or from the task's subfolder."""
    folders = TASKS[task]
    for base in (os.path.join(root, LC25000_SUBFOLDER[task]), root):
        if all(os.path.isdir(os.path.join(base, name)) for name in folders):
            return [(os.path.join(base, name, file), label)
                    for label, name in enumerate(folders)
                    for file in sorted(os.listdir(os.path.join(base, name)))
                    if file.lower().endswith((".jpg", ".jpeg", ".png"))]
    raise SystemExit(f"{task}={root}: expected LC25000's layout, lung_colon_image_set/{LC25000_SUBFOLDER[task]}/"
                     f"{{{','.join(folders)}}}/*.jpeg (the top folder or {LC25000_SUBFOLDER[task]}/).")


class ImageListDataset(Dataset):
    def __init__(self, samples, image_size):
        self.samples, self.transform = samples, data.eval_transform(image_size)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        return self.transform(data.load_rgb(path)), label


class PcamDataset(Dataset):
    """PatchCamelyon's HDF5 files, read a patch at a time (the test split alone is 32,768 x 96 x 96 x 3)."""

    def __init__(self, root, split, image_size):
        self.x_path, y_path = (os.path.join(root, f"camelyonpatch_level_2_split_{split}_{p}.h5") for p in "xy")
        for path in (self.x_path, y_path):
            if not os.path.isfile(path):
                raise SystemExit(f"pcam={root}: no {os.path.basename(path)}; expected PatchCamelyon's released "
                                 "camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5 files.")
        with h5py.File(y_path) as f:
            self.labels = f["y"][:].reshape(-1).astype(np.int64)
        self.transform, self.file = data.eval_transform(image_size), None

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        if self.file is None:  # opened lazily, once per worker process: h5py handles do not survive fork
            self.file = h5py.File(self.x_path, "r")
        from PIL import Image
        return self.transform(Image.fromarray(self.file["x"][i])), int(self.labels[i])


def load_dataset(task, root, image_size, split="test"):
    if task not in TASKS:
        raise SystemExit(f"--dataset {task}=...: unknown task; choose from {', '.join(TASKS)}.")
    if task == "pcam":
        return PcamDataset(root, split, image_size)
    return ImageListDataset(lc25000_samples(task, root), image_size)


def demo_datasets():
    root = os.path.dirname(data.ensure_demo_data())
    return {"pcam": os.path.join(root, "pcam"), "lc25000_lung": os.path.join(root, "lung_colon_image_set"),
            "lc25000_colon": os.path.join(root, "lung_colon_image_set")}


# ----------------------------------------------------------------------------- zero-shot

@torch.no_grad()
def encode_images(model, dataset, device, batch_size=256, workers=2):
    """L2-normalised image features (N, D) and labels (N,)."""
    model.eval()
    features, labels = [], []
    for images, targets in DataLoader(dataset, batch_size=batch_size, num_workers=workers):
        features.append(F.normalize(model.encode_image(images.to(device)).float(), dim=-1).cpu())
        labels.append(targets)
    return torch.cat(features), torch.cat(labels)


@torch.no_grad()
def zero_shot_classifier(model, tokenizer, classnames, device):
    """(D, C): per class, the mean of its normalised template embeddings, renormalised."""
    model.eval()
    weights = []
    for name in classnames:
        tokens = data.tokenize(tokenizer, [t.format(name) for t in TEMPLATES], model.config.context_length)
        embeddings = F.normalize(model.encode_text(tokens.to(device)).float(), dim=-1)
        weights.append(F.normalize(embeddings.mean(0), dim=-1))
    return torch.stack(weights, dim=1).cpu()


def classification_metrics(labels, predictions, num_classes):
    """Accuracy, balanced accuracy, weighted F1, per-class recall and the confusion matrix."""
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)  # rows: truth, columns: prediction
    confusion.index_put_((labels, predictions), torch.ones_like(labels), accumulate=True)
    support, predicted = confusion.sum(1).double(), confusion.sum(0).double()
    true_positive = confusion.diag().double()
    recall = true_positive / support.clamp(min=1)
    precision = true_positive / predicted.clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    return {"accuracy": (true_positive.sum() / support.sum()).item(),
            "balanced_accuracy": recall[support > 0].mean().item(),
            "weighted_f1": ((f1 * support).sum() / support.sum()).item(),
            "per_class_recall": recall.tolist(), "confusion_matrix": confusion.tolist()}


def zero_shot(model, tokenizer, task, dataset, device):
    classifier = zero_shot_classifier(model, tokenizer, list(TASKS[task].values()), device)
    features, labels = encode_images(model, dataset, device)
    return classification_metrics(labels, (features @ classifier).argmax(1), len(TASKS[task]))


def demo_zero_shot(model, tokenizer, device):
    """Zero-shot accuracy on the demo's held-out sets, printed and returned."""
    results = {}
    for task, root in demo_datasets().items():
        dataset = load_dataset(task, root, model.config.image_size)
        results[task] = zero_shot(model, tokenizer, task, dataset, device)["accuracy"]
        print(f"demo zero-shot {task:14s} accuracy {results[task]:.3f} (chance {1 / len(TASKS[task]):.3f})")
    return results
