"""RUN/manifest.json: everything that could change a result (RULE 9), for a paper to cite and a
reader to check. Its top level is the run as its first invocation started it; `history` holds
every invocation, the first and each resume (when, where, how many processes, from which step,
with which libraries), so that no resume rewrites what came before."""
import datetime
import json
import os
import socket
import sys
import time

import torch

import data
from support.files import images_fingerprint, write_json
from support.machine import environment
from support.resize import resize_record
from support.train_flags import image_root
from support.tree_all_reduce import world_size_guarantee


def run_record(args, run_dir, proc, schedule, cfg, tokenizer, train_data):
    """What the run is: its resolved flags, schedule, data, tokenizer and determinism."""
    tokenizer_path = args.tokenizer or os.path.join(run_dir, "tokenizer")
    return {
        "args": vars(args), "command": " ".join(sys.argv), "model_config": vars(cfg),
        "seed": args.seed, "world_size": proc.world,
        "global_batch_size": schedule.global_batch, "steps_per_epoch": schedule.steps_per_epoch,
        "total_steps": schedule.total_steps, "warmup_steps": schedule.warmup,
        "train_data": {"path": os.path.abspath(args.train_data),
                       "rows": len(train_data.rows),
                       "bad_rows": len(train_data.rows) - len(train_data.samples),
                       "split_filter": train_data.split_filter,
                       "crop_fallback_share": train_data.crop_fallback,
                       "sha256": train_data.sha256,
                       # Only the first record reads the image files: a resume appends history.
                       "images": images_fingerprint(train_data.rows.paths, image_root(args)),
                       "resized": resize_record(args.train_data)},
        "tokenizer": {"path": os.path.abspath(tokenizer_path), "vocab_size": len(tokenizer),
                      "sha256": data.tokenizer_fingerprint(tokenizer)},
        "determinism": {"deterministic": args.deterministic,
                        "tf32": torch.backends.cuda.matmul.allow_tf32,
                        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
                        "cudnn_benchmark": torch.backends.cudnn.benchmark},
        "world_size_guarantee": world_size_guarantee(args, proc.world),
    }


def invocation_record(args, proc, start_step, startup_seconds):
    """This invocation: when, where, on how many processes, from which step, with what."""
    return {"started": datetime.datetime.now().isoformat(), "command": " ".join(sys.argv),
            "host": socket.gethostname(), "world_size": proc.world,
            "batch_size": args.batch_size, "accum_steps": args.accum_steps,
            "from_step": start_step, **environment(proc.device),
            "startup_seconds": startup_seconds}


def environment_changes(first, now):
    """'versions.torch 2.14.1 there, 2.15.0 here', ...: where this invocation's libraries,
    code or hardware differ from the run's first (threads per process included)."""
    changes = []
    for section in ("versions", "git", "device"):
        for key in sorted(set(first.get(section, {})) | set(now[section])):
            there = first.get(section, {}).get(key)
            here = now[section].get(key)
            if there != here:
                changes.append(f"{section}.{key} {there!r} there, {here!r} here")
    return changes


def write_manifest(args, run_dir, proc, schedule, cfg, tokenizer, train_data, start_step,
                   startup_seconds):
    """manifest.json at the start of an invocation; returned, for `finish` to complete.
    A resume appends to the history of the manifest it finds and changes nothing else."""
    # RULE 9: the manifest records everything that could change a result: every resolved flag,
    # the data, the tokenizer, the determinism settings, the libraries and the machine.
    path = os.path.join(run_dir, "manifest.json")
    invocation = invocation_record(args, proc, start_step, startup_seconds)
    manifest = None
    if start_step and os.path.exists(path):
        with open(path) as f:
            manifest = json.load(f)
    if manifest is None:  # a new run (or one whose manifest was lost): the first record
        manifest = {**run_record(args, run_dir, proc, schedule, cfg, tokenizer, train_data),
                    **environment(proc.device), "startup_seconds": startup_seconds,
                    "started": invocation["started"], "history": []}
    history = manifest.setdefault("history", [])  # a manifest of an older version has none
    changes = environment_changes(manifest, invocation)
    if changes and history:
        print(f"note: this resume runs on other libraries, code or hardware than the run "
              f"started on: {'; '.join(changes)}. Bits may differ from an uninterrupted run "
              "(RULE 3); the manifest's history records it.")
        invocation["differs_from_start"] = changes
    history.append(invocation)
    write_json(path, manifest)
    return manifest


def finish_invocation(manifest, run_dir, to_step, started):
    """Close this invocation's entry of the history, and the run too if it reached its last
    step (an invocation that --stop-at-step ended is continued by a resume), then write the
    manifest. `started`: this invocation's start, time.time()."""
    finished = datetime.datetime.now().isoformat()
    if to_step == manifest["total_steps"]:
        manifest["finished"] = finished
    manifest["history"][-1].update(finished=finished, to_step=to_step,
                                   wall_time_s=round(time.time() - started, 1))
    write_json(os.path.join(run_dir, "manifest.json"), manifest)
