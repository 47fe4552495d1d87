"""The demo dataset: synthetic H&E-like tiles, generated deterministically on first use, so that
`torchrun --standalone --nproc_per_node=2 train.py` runs offline out of the box. Not the lesson:
nothing here is about CLIP; it only paints pictures whose captions a CLIP model can learn.

    python demo_data.py       # writes the demo dataset into data/demo and prints where
"""
import csv
import os
import shutil
import sys
import time

import numpy as np
from PIL import Image

from plumbing import REPO_DIR

DEMO_DIR = os.path.join(REPO_DIR, "data", "demo")

# Synthetic H&E-like tiles. Each tile is drawn as stain concentrations (hematoxylin for nuclei,
# eosin for cytoplasm and stroma) turned into colour by Beer-Lambert's law, as real stains absorb.
# Classes differ by subtle, overlapping cues driven by a latent "atypia" score whose distributions
# overlap between benign and malignant classes, so even a perfect model stays below 100%.

DEMO_CLASSES = {  # class: (phrases for captions; the first is the evaluation's class name)
    "colon_aca": ["colon adenocarcinoma", "adenocarcinoma of the colon", "malignant colonic glands",
                  "invasive colonic adenocarcinoma with crowded irregular glands"],
    "colon_n": ["benign colonic tissue", "normal colonic mucosa", "benign colon with regular crypts",
                "unremarkable colonic mucosa"],
    "lung_aca": ["lung adenocarcinoma", "adenocarcinoma of the lung", "malignant glandular lung tumor",
                 "pulmonary adenocarcinoma with acinar glands"],
    "lung_n": ["benign lung", "normal lung parenchyma", "benign lung with thin alveolar septa",
               "unremarkable alveolar lung tissue"],
    "lung_scc": ["lung squamous cell carcinoma", "squamous cell carcinoma of the lung",
                 "keratinizing squamous carcinoma of the lung", "pulmonary squamous cell carcinoma with keratin"],
    "node_n": ["lymph node", "benign lymph node", "reactive lymph node with small lymphocytes",
               "lymph node negative for tumor"],
    "node_met": ["lymph node containing metastatic tumor tissue", "metastatic carcinoma in a lymph node",
                 "lymph node with metastatic tumor deposits", "nodal metastasis of carcinoma"],
}
CAPTION_TEMPLATES = ["{}", "{}.", "H&E section of {}.", "{}, 20x.", "histology of {}", "microscopy: {}.",
                     "high power view of {}", "a case of {}.", "this tile shows {}.", "{} (hematoxylin and eosin)."]
MALIGNANT = {"colon_aca", "lung_aca", "lung_scc", "node_met"}
TILE = 96  # pixels, as PatchCamelyon's patches


def _ellipses(rng, yx, radius, elongation, strength):
    """Sum of soft-edged ellipses at centres `yx` (N, 2): a (TILE, TILE) concentration map. Each ellipse is
    evaluated only in a window around its centre, the windows summed with bincount: hundreds of nuclei in ~1 ms."""
    half = int(np.ceil(2 * (radius * elongation).max()))
    offsets = np.arange(-half, half + 1)
    ys = np.floor(yx[:, 0, None, None]).astype(int) + offsets[None, :, None]  # (N, W, 1)
    xs = np.floor(yx[:, 1, None, None]).astype(int) + offsets[None, None, :]  # (N, 1, W)
    angle = rng.uniform(0, np.pi, len(yx))[:, None, None]
    dy, dx = ys - yx[:, 0, None, None], xs - yx[:, 1, None, None]             # (N, W, W) by broadcasting
    u, v = dy * np.cos(angle) + dx * np.sin(angle), -dy * np.sin(angle) + dx * np.cos(angle)
    r = radius[:, None, None]
    d = np.minimum(np.sqrt((u / (r * elongation[:, None, None])) ** 2 + (v / r) ** 2), 10)
    values = strength[:, None, None] / (1 + np.exp(6 * (d - 1)))
    ys, xs = np.broadcast_to(ys, values.shape), np.broadcast_to(xs, values.shape)
    inside = (ys >= 0) & (ys < TILE) & (xs >= 0) & (xs < TILE)
    return np.bincount((ys * TILE + xs)[inside], values[inside], TILE * TILE).reshape(TILE, TILE).astype(np.float32)


def _ring(rng, centre, radius, count, jitter):
    """`count` points around a circle (gland epithelium), displaced by `jitter` pixels."""
    theta = np.linspace(0, 2 * np.pi, count, endpoint=False) + rng.uniform(0, 2 * np.pi)
    points = centre + radius * np.stack([np.sin(theta), np.cos(theta)], 1)
    return points + rng.normal(0, jitter + 1e-3, points.shape)


def render_tile(rng, label):
    """One RGB uint8 tile of class `label`."""
    organ = label.split("_")[0]
    # Colon's classes differ by atypia alone (no change of architecture), so its two means lie further apart.
    benign, malignant = (0.2, 0.75) if organ == "colon" else (0.3, 0.65)
    atypia = float(np.clip(rng.normal(malignant if label in MALIGNANT else benign, 0.15), 0, 1))
    zoom = rng.uniform(0.85, 1.15)
    hema, eosin = np.zeros((TILE, TILE), np.float32), np.full((TILE, TILE), rng.uniform(0.25, 0.45), np.float32)
    nuclei = []  # (centres, base radius) groups

    def holes(centres, radii):  # white spaces: gland lumens, alveoli
        eosin[:] = eosin * np.exp(-_ellipses(rng, centres, radii, np.ones(len(radii)), np.full(len(radii), 4.0)))

    # Lung tumours mix patterns, as real ones do: a solid area in an adenocarcinoma, a gland-like nest
    # in a squamous carcinoma. Then only keratin and cytoplasm tell them apart.
    pattern = {"colon": "glands", "node": "node", "lung": {
        "lung_n": "alveoli", "lung_aca": "glands" if rng.random() < 0.85 else "sheet",
        "lung_scc": "sheet" if rng.random() < 0.85 else "glands"}.get(label)}[organ]
    if organ == "lung":  # alveolar spaces in every lung tile; tumour fills most of them in
        count = 9 if pattern == "alveoli" else 3
        holes(rng.uniform(0, TILE, (count, 2)), zoom * rng.uniform(9, 14, count))
    if pattern == "glands":
        for _ in range(rng.integers(2, 5) if organ == "colon" else rng.integers(1, 3)):
            centre, radius = rng.uniform(15, 81, 2), zoom * rng.uniform(10, 15)
            holes(centre[None], np.array([radius * (0.6 - 0.35 * atypia)]))
            if rng.random() < atypia - 0.3:  # cribriform: extra small lumens bridging the gland
                holes(centre + rng.normal(0, radius / 3, (3, 2)), np.full(3, radius * 0.18))
            # Benign glands: one regular ring. Atypia: crowded, jittered, stratified (two rings).
            count = int(radius * (0.8 + 0.8 * atypia))
            nuclei.append((_ring(rng, centre, radius * 0.75, count, 4 * atypia * zoom), 2.3))
            if rng.random() < atypia:
                nuclei.append((_ring(rng, centre, radius * 1.05, count, 4 * atypia * zoom), 2.3))
            if organ == "colon" and rng.random() > atypia:  # goblet cells' pale mucin, lost in carcinoma
                holes(_ring(rng, centre, radius * 0.6, 6, 1.0), np.full(6, 2.2 * zoom))
    elif pattern == "sheet":  # cells on a jittered grid; squamous ones have pink cytoplasm and keratin pearls
        step = zoom * (10 - 2 * atypia)
        axis = np.arange(step / 2, TILE, step)
        yx = np.stack(np.meshgrid(axis, axis), -1).reshape(-1, 2)
        nuclei.append((yx + rng.normal(0, 1.5, yx.shape), 2.3))
        eosin += 0.25 if label == "lung_scc" else 0.1
        pearls = rng.integers(0, 3) if label == "lung_scc" else 0
        for centre in rng.uniform(15, 81, (pearls, 2)):
            eosin += 0.5 * _ellipses(rng, centre[None], np.array([7.0 * zoom]), np.ones(1), np.ones(1))
    elif pattern == "alveoli":  # thin septa holding sparse small nuclei
        nuclei.append((rng.uniform(0, TILE, (int(20 + 30 * atypia), 2)), 1.9))
    else:  # lymph node: a carpet of small dark lymphocytes; metastases add a cluster of large pale cells
        nuclei.append((rng.uniform(0, TILE, (int(zoom * 150), 2)), 1.8))
        if large := int(30 * atypia ** 2):
            nuclei.append((rng.uniform(25, 71, 2) + rng.normal(0, 12 * zoom, (large, 2)), 3.4))
    nuclei.append((rng.uniform(0, TILE, (int(12 + 8 * atypia), 2)), 1.8))  # scattered stromal cells everywhere

    for centres, base in nuclei:
        n = len(centres)
        # Atypia enlarges nuclei, varies their size (pleomorphism) and darkens them (hyperchromasia).
        radius = zoom * base * (1 + 0.5 * atypia) * np.exp(rng.normal(0, 0.08 + 0.25 * atypia, n))
        pale = 0.6 if base > 3 else 1.0  # tumour nuclei in nodes have open, paler chromatin
        strength = pale * rng.uniform(0.9, 1.3, n) * (0.9 + 0.4 * atypia)
        hema += _ellipses(rng, centres, radius, rng.uniform(1.0, 1.2 + 0.6 * atypia, n), strength)
    # Beer-Lambert: optical density = concentration x stain vector; stain colours vary slide to slide.
    h_vector = np.array([0.65, 0.70, 0.29]) * rng.uniform(0.85, 1.15, 3)
    e_vector = np.array([0.07, 0.99, 0.11]) * rng.uniform(0.85, 1.15, 3)
    density = hema[..., None] * h_vector + eosin[..., None] * e_vector
    density = density * rng.uniform(0.8, 1.2) + rng.normal(0, 0.03, density.shape)
    image = np.clip(255 * np.exp(-density), 0, 255).astype(np.uint8)
    return np.rot90(image, rng.integers(4)).copy()


def _write_demo(root, per_class_train, per_class_eval, seed):
    import h5py
    def rng_for(split, label, i):  # independent streams: any tile can be regenerated on its own
        return np.random.default_rng([seed, split, list(DEMO_CLASSES).index(label), i])

    rows = []
    for label in DEMO_CLASSES:
        os.makedirs(os.path.join(root, "train", label))
        for i in range(per_class_train):
            rng = rng_for(0, label, i)
            path = f"train/{label}/{i:05d}.jpg"
            Image.fromarray(render_tile(rng, label)).save(os.path.join(root, path), quality=90)
            rows.append((path, rng.choice(CAPTION_TEMPLATES).format(rng.choice(DEMO_CLASSES[label]))))
    rows.sort()  # the CSV order must not depend on the order we generated in
    with open(os.path.join(root, "train.csv"), "w", newline="") as f:
        csv.writer(f).writerows([("image_path", "caption")] + rows)
    # Held-out tiles in the released layouts: LC25000 folders of JPEGs and PatchCamelyon HDF5 files.
    for label in ("colon_aca", "colon_n", "lung_aca", "lung_n", "lung_scc"):
        folder = os.path.join(root, "lung_colon_image_set", f"{label.split('_')[0]}_image_sets", label)
        os.makedirs(folder)
        for i in range(per_class_eval):
            name = f"{label.replace('_', '').replace('colonaca', 'colonca')}{i + 1}.jpeg"
            Image.fromarray(render_tile(rng_for(1, label, i), label)).save(os.path.join(folder, name), quality=90)
    os.makedirs(os.path.join(root, "pcam"))
    for split_id, split, count in ((2, "train", 2 * per_class_eval), (3, "test", per_class_eval)):
        labels = [("node_n", "node_met")[i % 2] for i in range(2 * count)]
        x = np.stack([render_tile(rng_for(split_id, label, i), label) for i, label in enumerate(labels)])
        labels = [label == "node_met" for label in labels]
        for part, array in (("x", x), ("y", np.array(labels, np.uint8).reshape(-1, 1, 1, 1))):
            with h5py.File(os.path.join(root, "pcam", f"camelyonpatch_level_2_split_{split}_{part}.h5"), "w") as f:
                f.create_dataset(part, data=array)


def ensure_demo_data(root=DEMO_DIR, per_class_train=400, per_class_eval=100, seed=0):
    """Generate the demo dataset once; same bytes every time. Returns the path of its train.csv.

    Written into a temporary folder and renamed into place, so a crash leaves no half dataset and concurrent
    callers (e.g. tests) never read one. Under torchrun rank 0 calls this first while the others wait."""
    csv_path = os.path.join(root, "train.csv")
    if not os.path.exists(csv_path):
        tmp = f"{root}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        started = time.time()
        _write_demo(tmp, per_class_train, per_class_eval, seed)
        os.makedirs(os.path.dirname(root), exist_ok=True)
        try:
            os.rename(tmp, root)
        except OSError:  # somebody else finished first: theirs has the same bytes
            shutil.rmtree(tmp, ignore_errors=True)
        print(f"demo dataset written to {root} in {time.time() - started:.1f}s", file=sys.stderr)
    return csv_path


if __name__ == "__main__":
    print(ensure_demo_data())
