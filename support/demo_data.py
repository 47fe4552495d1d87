"""The synthetic demo: H&E-like tiles painted deterministically from a seed, written as a
training CSV of JPEGs and captions and as two held-out benchmarks in their released layouts
(support/image_sets.py reads them), so that train.py and evaluate.py run offline out of the box.
Not the lesson: nothing here is about CLIP.

    python -m support.demo_data   # writes the demo dataset into data/demo and prints where
"""
import csv
import os
import shutil
import sys
import time

import h5py
import numpy as np
from PIL import Image

from support.image_sets import LC25000_SUBFOLDER
from support.machine import REPO_DIR

DEMO_DIR = os.path.join(REPO_DIR, "data", "demo")


# ----------------------------------------------------------------------------- released layouts


# ----------------------------------------------------------------------------- the demo's tiles
# Synthetic H&E-like tiles: stain concentrations (hematoxylin for nuclei, eosin for cytoplasm and
# stroma) turned into colour by Beer-Lambert's law, as real stains absorb. The classes differ by
# cues driven by a latent "atypia" score whose distributions overlap between benign and malignant,
# so even a perfect model stays below 100%. A tile's pattern paints its spaces into `eosin` and
# returns its nuclei as (centres, base radius) groups for _paint_nuclei. Every helper draws from
# the tile's `rng` in a fixed order: adding, dropping or reordering a draw makes another dataset.

DEMO_CLASSES = {  # class: phrases for its captions; the first is the evaluation's class name
    "colon_aca": [
        "colon adenocarcinoma", "adenocarcinoma of the colon",
        "malignant colonic glands", "invasive colonic adenocarcinoma with crowded irregular glands",
    ],
    "colon_n": [
        "benign colonic tissue", "normal colonic mucosa",
        "benign colon with regular crypts", "unremarkable colonic mucosa",
    ],
    "lung_aca": [
        "lung adenocarcinoma", "adenocarcinoma of the lung",
        "malignant glandular lung tumor", "pulmonary adenocarcinoma with acinar glands",
    ],
    "lung_n": [
        "benign lung", "normal lung parenchyma",
        "benign lung with thin alveolar septa", "unremarkable alveolar lung tissue",
    ],
    "lung_scc": [
        "lung squamous cell carcinoma", "squamous cell carcinoma of the lung",
        "keratinizing squamous carcinoma of the lung",
        "pulmonary squamous cell carcinoma with keratin",
    ],
    "node_n": [
        "lymph node", "benign lymph node",
        "reactive lymph node with small lymphocytes", "lymph node negative for tumor",
    ],
    "node_met": [
        "lymph node containing metastatic tumor tissue", "metastatic carcinoma in a lymph node",
        "lymph node with metastatic tumor deposits", "nodal metastasis of carcinoma",
    ],
}
CAPTION_TEMPLATES = ["{}", "{}.", "H&E section of {}.", "{}, 20x.", "histology of {}",
                     "microscopy: {}.", "high power view of {}", "a case of {}.",
                     "this tile shows {}.", "{} (hematoxylin and eosin)."]
MALIGNANT = {"colon_aca", "lung_aca", "lung_scc", "node_met"}
TILE = 96  # pixels, as PatchCamelyon's patches


def _ellipses(rng, yx, radius, elongation, strength):
    """Soft-edged ellipses at `yx` (N, 2) summed into a (TILE, TILE) map by windows and bincount."""
    half = int(np.ceil(2 * (radius * elongation).max()))
    offsets = np.arange(-half, half + 1)
    ys = np.floor(yx[:, 0, None, None]).astype(int) + offsets[None, :, None]  # (N, W, 1)
    xs = np.floor(yx[:, 1, None, None]).astype(int) + offsets[None, None, :]  # (N, 1, W)
    angle = rng.uniform(0, np.pi, len(yx))[:, None, None]
    dy = ys - yx[:, 0, None, None]  # (N, W, W) by broadcasting
    dx = xs - yx[:, 1, None, None]
    u = dy * np.cos(angle) + dx * np.sin(angle)  # along the ellipse's long axis
    v = -dy * np.sin(angle) + dx * np.cos(angle)
    r = radius[:, None, None]
    d = np.sqrt((u / (r * elongation[:, None, None])) ** 2 + (v / r) ** 2)
    d = np.minimum(d, 10)  # 1 on the rim; capped, as far outside exp would overflow
    values = strength[:, None, None] / (1 + np.exp(6 * (d - 1)))
    ys = np.broadcast_to(ys, values.shape)
    xs = np.broadcast_to(xs, values.shape)
    inside = (ys >= 0) & (ys < TILE) & (xs >= 0) & (xs < TILE)
    pixel = (ys * TILE + xs)[inside]
    total = np.bincount(pixel, values[inside], TILE * TILE)
    return total.reshape(TILE, TILE).astype(np.float32)


def _ring(rng, centre, radius, count, jitter):
    """`count` points around a circle (gland epithelium), displaced by `jitter` pixels."""
    theta = np.linspace(0, 2 * np.pi, count, endpoint=False) + rng.uniform(0, 2 * np.pi)
    points = centre + radius * np.stack([np.sin(theta), np.cos(theta)], 1)
    return points + rng.normal(0, jitter + 1e-3, points.shape)


def _holes(rng, eosin, centres, radii):
    """Clear the eosin, in place, in round white spaces: gland lumens, alveoli."""
    elongation = np.ones(len(radii))
    strength = np.full(len(radii), 4.0)
    eosin *= np.exp(-_ellipses(rng, centres, radii, elongation, strength))


def _pattern(rng, label):
    """Glands, sheet, alveoli or lymph node. Lung tumours mix patterns, as real ones do."""
    # Both draws are made for every tile, whatever its class, as the demo was first generated.
    adenocarcinoma_has_glands = rng.random() < 0.85
    squamous_is_a_sheet = rng.random() < 0.85
    if label == "lung_aca":
        return "glands" if adenocarcinoma_has_glands else "sheet"
    if label == "lung_scc":
        return "sheet" if squamous_is_a_sheet else "glands"
    return {"colon": "glands", "lung": "alveoli", "node": "node"}[label.split("_")[0]]


def _glands(rng, eosin, organ, zoom, atypia):
    """Lumens ringed by epithelial nuclei; atypia crowds, jitters and doubles the rings."""
    nuclei = []
    glands = rng.integers(2, 5) if organ == "colon" else rng.integers(1, 3)
    for _ in range(glands):
        centre = rng.uniform(15, 81, 2)
        radius = zoom * rng.uniform(10, 15)
        _holes(rng, eosin, centre[None], np.array([radius * (0.6 - 0.35 * atypia)]))
        if rng.random() < atypia - 0.3:  # cribriform: extra small lumens bridging the gland
            lumens = centre + rng.normal(0, radius / 3, (3, 2))
            _holes(rng, eosin, lumens, np.full(3, radius * 0.18))
        count = int(radius * (0.8 + 0.8 * atypia))
        jitter = 4 * atypia * zoom
        nuclei.append((_ring(rng, centre, radius * 0.75, count, jitter), 2.3))
        if rng.random() < atypia:
            nuclei.append((_ring(rng, centre, radius * 1.05, count, jitter), 2.3))
        if organ == "colon" and rng.random() > atypia:  # goblet cells' pale mucin, lost in cancer
            goblets = _ring(rng, centre, radius * 0.6, 6, 1.0)
            _holes(rng, eosin, goblets, np.full(6, 2.2 * zoom))
    return nuclei


def _sheet(rng, eosin, label, zoom, atypia):
    """Cells on a jittered grid, denser with atypia; squamous: pink cytoplasm, keratin pearls."""
    step = zoom * (10 - 2 * atypia)
    axis = np.arange(step / 2, TILE, step)
    yx = np.stack(np.meshgrid(axis, axis), -1).reshape(-1, 2)
    nuclei = [(yx + rng.normal(0, 1.5, yx.shape), 2.3)]
    if label == "lung_scc":
        eosin += 0.25
        pearls = rng.integers(0, 3)
    else:
        eosin += 0.1
        pearls = 0
    for centre in rng.uniform(15, 81, (pearls, 2)):
        eosin += 0.5 * _ellipses(rng, centre[None], np.array([7.0 * zoom]), np.ones(1), np.ones(1))
    return nuclei


def _lymph_node(rng, zoom, atypia):
    """A carpet of small dark lymphocytes; a metastasis adds a cluster of large pale cells."""
    nuclei = [(rng.uniform(0, TILE, (int(zoom * 150), 2)), 1.8)]  # lymphocytes
    large = int(30 * atypia ** 2)
    if large:
        centre = rng.uniform(25, 71, 2)
        nuclei.append((centre + rng.normal(0, 12 * zoom, (large, 2)), 3.4))
    return nuclei


def _paint_nuclei(rng, nuclei, zoom, atypia):
    """The hematoxylin map (TILE, TILE) of all nuclei groups."""
    hema = np.zeros((TILE, TILE), np.float32)
    for centres, base in nuclei:
        n = len(centres)
        # Atypia enlarges nuclei, varies their size (pleomorphism), darkens them (hyperchromasia).
        spread = np.exp(rng.normal(0, 0.08 + 0.25 * atypia, n))
        radius = zoom * base * (1 + 0.5 * atypia) * spread
        pale = 0.6 if base > 3 else 1.0  # tumour nuclei in nodes have open, paler chromatin
        strength = pale * rng.uniform(0.9, 1.3, n) * (0.9 + 0.4 * atypia)
        elongation = rng.uniform(1.0, 1.2 + 0.6 * atypia, n)
        hema += _ellipses(rng, centres, radius, elongation, strength)
    return hema


def _stain(rng, hema, eosin):
    """Concentrations -> RGB uint8 by Beer-Lambert: optical density = sum of concentration x stain
    vector. Stain colours vary from slide to slide."""
    h_vector = np.array([0.65, 0.70, 0.29]) * rng.uniform(0.85, 1.15, 3)
    e_vector = np.array([0.07, 0.99, 0.11]) * rng.uniform(0.85, 1.15, 3)
    density = hema[..., None] * h_vector + eosin[..., None] * e_vector  # (TILE, TILE, 3)
    density = density * rng.uniform(0.8, 1.2) + rng.normal(0, 0.03, density.shape)
    return np.clip(255 * np.exp(-density), 0, 255).astype(np.uint8)


def render_tile(rng, label):
    """One RGB uint8 tile (TILE, TILE, 3) of class `label`."""
    organ = label.split("_")[0]
    malignant = label in MALIGNANT
    if organ == "colon":  # its classes differ by atypia alone, so their means lie further apart
        mean = 0.75 if malignant else 0.2
    else:
        mean = 0.65 if malignant else 0.3
    atypia = float(np.clip(rng.normal(mean, 0.15), 0, 1))
    zoom = rng.uniform(0.85, 1.15)
    eosin = np.full((TILE, TILE), rng.uniform(0.25, 0.45), np.float32)
    pattern = _pattern(rng, label)
    if organ == "lung":  # alveolar spaces in every lung tile; tumour fills most of them in
        count = 9 if pattern == "alveoli" else 3
        centres = rng.uniform(0, TILE, (count, 2))
        _holes(rng, eosin, centres, zoom * rng.uniform(9, 14, count))
    if pattern == "glands":
        nuclei = _glands(rng, eosin, organ, zoom, atypia)
    elif pattern == "sheet":
        nuclei = _sheet(rng, eosin, label, zoom, atypia)
    elif pattern == "alveoli":  # thin septa between the air spaces, holding sparse small nuclei
        nuclei = [(rng.uniform(0, TILE, (int(20 + 30 * atypia), 2)), 1.9)]
    else:
        nuclei = _lymph_node(rng, zoom, atypia)
    stromal = rng.uniform(0, TILE, (int(12 + 8 * atypia), 2))  # scattered in every tissue
    nuclei.append((stromal, 1.8))
    hema = _paint_nuclei(rng, nuclei, zoom, atypia)
    image = _stain(rng, hema, eosin)
    return np.rot90(image, rng.integers(4)).copy()


# ----------------------------------------------------------------------------- the demo on disk

def _tile_rng(seed, split, label, i):
    """Tile i of `label` in `split` (0 train, 1 LC25000, 2-3 PCam): a stream of its own."""
    return np.random.default_rng([seed, split, list(DEMO_CLASSES).index(label), i])


def _write_train_split(root, per_class, seed):
    """JPEGs under train/<class>/ and train.csv with a caption for each."""
    rows = []
    for label in DEMO_CLASSES:
        os.makedirs(os.path.join(root, "train", label))
        for i in range(per_class):
            rng = _tile_rng(seed, 0, label, i)
            path = f"train/{label}/{i:05d}.jpg"
            Image.fromarray(render_tile(rng, label)).save(os.path.join(root, path), quality=90)
            template = rng.choice(CAPTION_TEMPLATES)  # drawn before the phrase, as first generated
            phrase = rng.choice(DEMO_CLASSES[label])
            rows.append((path, template.format(phrase)))
    rows.sort()  # the CSV order must not depend on the order we generated in
    with open(os.path.join(root, "train.csv"), "w", newline="") as f:
        csv.writer(f).writerows([("image_path", "caption")] + rows)


def _write_lc25000(root, per_class, seed):
    """Held-out lung and colon tiles in LC25000's released layout of folders of JPEGs."""
    for label in ("colon_aca", "colon_n", "lung_aca", "lung_n", "lung_scc"):
        organ = label.split("_")[0]
        folder = os.path.join(root, "lung_colon_image_set", f"{organ}_image_sets", label)
        os.makedirs(folder)
        prefix = label.replace("_", "").replace("colonaca", "colonca")  # LC25000's file names
        for i in range(per_class):
            tile = render_tile(_tile_rng(seed, 1, label, i), label)
            path = os.path.join(folder, f"{prefix}{i + 1}.jpeg")
            Image.fromarray(tile).save(path, quality=90)


def _write_pcam(root, per_class, seed):
    """Held-out lymph node tiles as PatchCamelyon's HDF5 x (N, 96, 96, 3), y (N, 1, 1, 1)."""
    os.makedirs(os.path.join(root, "pcam"))
    for split_id, split, count in ((2, "train", 2 * per_class), (3, "test", per_class)):
        labels = [("node_n", "node_met")[i % 2] for i in range(2 * count)]
        tiles = [render_tile(_tile_rng(seed, split_id, label, i), label)
                 for i, label in enumerate(labels)]
        is_metastasis = np.array([label == "node_met" for label in labels], np.uint8)
        for part, array in (("x", np.stack(tiles)), ("y", is_metastasis.reshape(-1, 1, 1, 1))):
            name = f"camelyonpatch_level_2_split_{split}_{part}.h5"
            with h5py.File(os.path.join(root, "pcam", name), "w") as f:
                f.create_dataset(part, data=array)


def ensure_demo_data(root=DEMO_DIR, per_class_train=400, per_class_eval=100, seed=0):
    """The demo's train.csv, written once (same bytes every time) into a temporary folder renamed
    into place: nobody ever reads half a dataset. Under torchrun rank 0 calls it first."""
    csv_path = os.path.join(root, "train.csv")
    if not os.path.exists(csv_path):
        tmp = f"{root}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        started = time.time()
        _write_train_split(tmp, per_class_train, seed)  # and two held-out benchmarks:
        _write_lc25000(tmp, per_class_eval, seed)
        _write_pcam(tmp, per_class_eval, seed)
        os.makedirs(os.path.dirname(root), exist_ok=True)
        try:
            os.rename(tmp, root)
        except OSError:  # somebody else finished first: theirs has the same bytes
            shutil.rmtree(tmp, ignore_errors=True)
        print(f"demo dataset written to {root} in {time.time() - started:.1f}s", file=sys.stderr)
    return csv_path


def demo_datasets():
    """{task: folder} of the demo's held-out sets, written on first use."""
    root = os.path.dirname(ensure_demo_data())
    lc25000 = os.path.join(root, "lung_colon_image_set")
    return {"pcam": os.path.join(root, "pcam"), **dict.fromkeys(LC25000_SUBFOLDER, lc25000)}


if __name__ == "__main__":
    print(ensure_demo_data())
