"""Files written so that a kill never leaves half of one (temporary name, fsync, rename), and
the fingerprints of files and weights that the manifest records."""
import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path

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


def check_output_path(path, flag):
    """Refuse, before any work, an output file that could not be written: its folder missing,
    not a folder, or not writable; or the path itself a folder."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path}: a folder, not a file. Name a file in it.")
    if not os.path.isdir(folder):
        cause = "is not a folder" if os.path.exists(folder) else "does not exist"
        raise UsageError(f"{flag} {path}: its folder {folder} {cause}. Create it first.")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{flag} {path}: its folder {folder} is not writable.")
