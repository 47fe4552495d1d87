"""RUN/manifest.json: everything that could change a result (RULE 9), for a paper to cite and a
reader to check."""
import datetime
import json
import os
import sys

import torch

import data
from support.files import write_json
from support.machine import environment
from support.resize import resize_record
from support.tree_all_reduce import world_size_guarantee

def write_manifest(args, run_dir, proc, schedule, cfg, tokenizer, train_data, resumed,
                   startup_seconds):
    """manifest.json; returned, for `finish` to complete. A resumed run keeps its start time."""
    # RULE 9: the manifest records everything that could change a result: every resolved flag,
    # the data, the tokenizer, the determinism settings, the libraries and the machine.
    path = os.path.join(run_dir, "manifest.json")
    manifest = {}
    if resumed and os.path.exists(path):
        manifest = json.load(open(path))
    tokenizer_path = args.tokenizer or os.path.join(run_dir, "tokenizer")
    manifest.update({
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
                       "resized": resize_record(args.train_data)},
        "tokenizer": {"path": os.path.abspath(tokenizer_path), "vocab_size": len(tokenizer),
                      "sha256": data.tokenizer_fingerprint(tokenizer)},
        "determinism": {"deterministic": args.deterministic,
                        "tf32": torch.backends.cuda.matmul.allow_tf32,
                        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
                        "cudnn_benchmark": torch.backends.cudnn.benchmark},
        "world_size_guarantee": world_size_guarantee(args, proc.world),
        **environment(proc.device),
        "startup_seconds": startup_seconds,
        "started": manifest.get("started", datetime.datetime.now().isoformat()),
    })
    write_json(path, manifest)
    return manifest
