"""The benchmarks' image sets as released: PatchCamelyon's HDF5 files, LC25000's class folders,
and any image folder of class subfolders, each with a fingerprint of its files."""
import hashlib
import os

import h5py
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from support.errors import UsageError
from support.images import load_rgb

LC25000_SUBFOLDER = {"lc25000_lung": "lung_image_sets", "lc25000_colon": "colon_image_sets"}


LC25000_NOTE = ("LC25000 is 1,250 originals augmented to 25,000: a random split puts augmented "
                "siblings of test images into the probe's training set, so the probe's score is "
                "optimistic")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff")


def files_fingerprint(paths, parts):
    """sha256 of the sorted (last `parts` path components, size) list: cheap; blind to rewrites."""
    listing = sorted(f"{os.path.join(*p.split(os.sep)[-parts:])}\t{os.path.getsize(p)}\n"
                     for p in paths)
    return hashlib.sha256("".join(listing).encode()).hexdigest()


def lc25000_samples(task, root, folders):
    """[(image path, label)], label = the folder's position in `folders` (explicit, never sort
    order). LC25000 is found from its top folder or the task's subfolder; image folders at root."""
    bases = [os.path.join(root, LC25000_SUBFOLDER[task])] if task in LC25000_SUBFOLDER else []
    for base in bases + [root]:
        if not all(os.path.isdir(os.path.join(base, name)) for name in folders):
            continue
        samples = []
        empty = []
        for label, name in enumerate(folders):
            files = sorted(os.listdir(os.path.join(base, name)))
            images = [file for file in files if file.lower().endswith(IMAGE_EXTENSIONS)]
            samples += [(os.path.join(base, name, file), label) for file in images]
            if not images:
                empty.append(name)
        if empty:
            raise UsageError(f"{task}={root}: no images ({', '.join(IMAGE_EXTENSIONS)}) "
                             f"in {', '.join(empty)}.")
        return samples
    layout = f"{{{','.join(folders)}}}/*.jpeg"
    if bases:
        layout = (f"lung_colon_image_set/{LC25000_SUBFOLDER[task]}/{layout} "
                  "(the top folder or its subfolder)")
    raise UsageError(f"{task}={root}: expected the layout {layout}.")


class ImageListDataset(Dataset):
    """(image, label) pairs; with transform=None the images stay PIL images, as in torchvision."""

    def __init__(self, samples, transform=None):
        self.samples = samples
        self.transform = transform
        self.labels = torch.tensor([label for _, label in samples])
        self.fingerprint = files_fingerprint([p for p, _ in samples], parts=2)  # class folder/file

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        image = load_rgb(path)
        return (self.transform(image) if self.transform else image), label


class PcamDataset(Dataset):
    """PatchCamelyon's HDF5 files, read a patch at a time: its 32,768 test patches are 906 MB."""

    def __init__(self, root, split, transform=None):
        prefix = os.path.join(root, f"camelyonpatch_level_2_split_{split}")
        self.x_path = f"{prefix}_x.h5"
        y_path = f"{prefix}_y.h5"
        try:  # only the labels are read now, one byte per patch
            with h5py.File(y_path, "r") as y_file, h5py.File(self.x_path, "r") as x_file:
                self.labels = torch.from_numpy(y_file["y"][:].reshape(-1).astype(np.int64))
                assert x_file["x"].shape[0] == len(self.labels), "as many patches as labels"
        except (OSError, KeyError, AssertionError) as e:
            missing = isinstance(e, FileNotFoundError)
            reason = "a file is missing" if missing else f"{type(e).__name__}: {e}"
            raise UsageError(f"pcam={root}: cannot read the {split} split ({reason}); expected "
                             "PatchCamelyon's camelyonpatch_level_2_split_{train,valid,test}_"
                             "{x,y}.h5 files (gunzipped).")
        self.transform = transform
        self.file = None
        self.file_pid = None
        self.fingerprint = files_fingerprint([self.x_path, y_path], parts=1)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        if self.file_pid != os.getpid():  # once per process: h5py handles do not survive fork
            self.file = h5py.File(self.x_path, "r")
            self.file_pid = os.getpid()
        image = Image.fromarray(self.file["x"][i])                         # (96, 96, 3) uint8
        return (self.transform(image) if self.transform else image), int(self.labels[i])


def load_dataset(task, root, folders, split="test", transform=None):
    """One task's images in its released layout; an image folder's from `folders`."""
    if task == "pcam":
        return PcamDataset(root, split, transform)
    return ImageListDataset(lc25000_samples(task, root, folders), transform)
