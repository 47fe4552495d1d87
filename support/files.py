"""Files written so that a kill never leaves half of one (temporary name, fsync, rename), output
paths checked before the work that fills them, and the fingerprints of files and weights that the
manifest records."""
import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from support.errors import UsageError


def check_output(path, flag, folder=False):
    """Refuse, before any work, an output that could not be written there, naming the path and
    the cause: for a file, a path that is a folder, or whose folder is missing or read-only; for
    a `folder` (made if it is missing), a path that is a file, or whose nearest existing folder
    is read-only. The work itself may take an hour; a typo should cost a second."""
    path = os.fspath(path)
    if not folder and os.path.isdir(path):
        raise UsageError(f"{flag} {path}: is a folder; pass a file's path.")
    if folder and os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag} {path}: is a file, not a folder; pass a folder's path.")
    parent = os.path.dirname(os.path.abspath(path))
    if folder:  # made with its missing parents: the nearest folder that exists decides
        parent = os.path.abspath(path)
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
    if not os.path.exists(parent):
        raise UsageError(f"{flag} {path}: its folder {parent} does not exist; create it first, "
                         "or pass a path in a folder that exists.")
    if not os.path.isdir(parent):
        raise UsageError(f"{flag} {path}: {parent} is a file, not a folder.")
    # access(2) also says no on a read-only file system. (Root passes it on any mode.)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: no permission to write in {parent}; pass a path in a "
                         "folder you can write to.")


def give_ordinary_modes(folder):
    """Give every file in `folder` the mode that open() gives a new file: 0666 less the umask.
    Some writers (safetensors) make their files 0600, readable by their owner alone."""
    umask = os.umask(0)  # the only way to read the umask is to set it: put it back at once
    os.umask(umask)
    for name in os.listdir(folder):
        os.chmod(os.path.join(folder, name), 0o666 & ~umask)


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
    path = os.path.normpath(path)  # "out/" would put the temporary name inside the folder
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


def checkpoint_sha256(path):
    """sha256 of a weights file; of a Hugging Face CLIPModel folder, over its files' sha256s."""
    if os.path.isfile(path):
        return file_sha256(path)
    files = sorted(os.path.relpath(os.path.join(folder, name), path)
                   for folder, _, names in os.walk(path) for name in names)
    listing = "".join(f"{f}\t{file_sha256(os.path.join(path, f))}\n" for f in files)
    return hashlib.sha256(listing.encode()).hexdigest()


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
