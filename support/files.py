"""Files written so that a kill never leaves half of one (temporary name, fsync, rename), and
the fingerprints of files and weights that the manifest records."""
import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from support.errors import UsageError

def remove(path):
    """Delete a file or a whole folder."""
    if os.path.isdir(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


def atomic_write(path, write):
    """write(temporary path), a file or a new folder, then rename it into place."""
    # RULE 8: a kill leaves the old file intact, and no half-written one that a resume would load
    # (remove_leftovers tidies up after it).
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write(tmp)
        flush_to_disk(tmp)
        os.replace(tmp, path)
        fsync(os.path.dirname(os.path.abspath(path)))  # the rename itself
    except OSError as e:  # disk full, no permission: say so, and leave no partial file behind
        raise UsageError(f"cannot write {path}: {e.strerror or e}. Free some space or choose "
                         "another output folder; the files written before are intact.") from None
    finally:
        with contextlib.suppress(OSError):  # tidying up must not hide the error above
            remove(tmp)


def flush_to_disk(path):
    """fsync a new file, or a new folder's files and then the folder."""
    # RULE 8: the bytes reach the disk before the rename makes them the checkpoint, so a power
    # loss cannot leave an empty file under the name of the latest checkpoint.
    if os.path.isdir(path):
        for name in os.listdir(path):
            fsync(os.path.join(path, name))
    fsync(path)


def fsync(path):
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_json(path, obj):
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# Image files a fingerprint reads: all of a set this small (the demo's 2,800), else a sample.
IMAGE_SAMPLE = 5000
# A fixed seed, not the run's: runs of other seeds on the same images share the fingerprint.
IMAGE_SAMPLE_SEED = 0


def fingerprint_sample(count, sample=IMAGE_SAMPLE, seed=IMAGE_SAMPLE_SEED):
    """The row indices images_fingerprint reads, in order: all `count`, or `sample` of them."""
    if count <= sample:
        return range(count)
    picked = np.random.default_rng(seed).choice(count, sample, replace=False)
    return np.sort(picked).tolist()


def images_fingerprint(paths, root, sample=IMAGE_SAMPLE, seed=IMAGE_SAMPLE_SEED):
    """The image files' fingerprint: sha256 over the path (as the CSV gives it) and the bytes of
    each file of a seeded sample of `paths` (all of them, up to `sample`), with the counts and the
    seed. A re-encoded, resized or replaced image folder shows here, where the CSV's sha256 stays
    the same; one changed file among a million is found only if the sample holds it. A file that
    cannot be read counts as its path and "unreadable" (bad rows are --bad-samples' business)."""
    count = len(paths)
    indices = fingerprint_sample(count, sample, seed)
    digest = hashlib.sha256()
    for index in indices:
        path = paths[index]
        digest.update(path.encode() + b"\0")
        try:
            with open(os.path.join(root, path), "rb") as f:
                digest.update(hashlib.file_digest(f, "sha256").digest())
        except OSError:
            digest.update(b"unreadable")
    return {"sha256": digest.hexdigest(), "files": len(indices), "rows": count, "seed": seed}


def weights_sha256(state_dict):
    """A fingerprint of the weights alone: names, dtypes, shapes and bytes, in a fixed order."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def read_json(path, flag):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{flag}: cannot read {path} ({e}).")
