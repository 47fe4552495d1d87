"""What a run folder holds, read back, and what two of them share: the manifest's recorded facts
(RULE 9), checkpoints compared tensor by tensor, logs step by step, and the likeliest cause of
other bits. verify.py's two uses rest on it: a run and its replay here (support/replay.py), and
two runs side by side (`explain_runs`, below).

    python verify.py RUN_A RUN_B
"""
import json
import os
import types

import torch

from support.errors import UsageError
from support.pretrained import read_weights_file
from support.run_folder import step_checkpoints
from support.train_flags import MUST_MATCH_ON_RESUME, flag_name, make_parser
from support.training_log import read_log as read_log_records
from support.tree_all_reduce import world_size_guarantee

# ----------------------------------------------------------------------------- reading a run

def read_manifest(run_dir):
    """RUN/manifest.json; a folder that is no run of this version is refused in one line."""
    path = os.path.join(run_dir, "manifest.json")
    if not os.path.isdir(run_dir):
        raise UsageError(f"{run_dir}: no such folder. Pass the --output-dir of a train.py run.")
    if not os.path.isfile(path):
        raise UsageError(f"{run_dir}: not a run folder of train.py (no manifest.json in it). "
                         "Pass the --output-dir of a run.")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: not readable as JSON ({e}). Restore it from a copy of the "
                         "run folder.")
    if not isinstance(manifest, dict) or "history" not in manifest or "args" not in manifest:
        raise UsageError(f"{path}: written by an older train.py, which kept no history of "
                         "invocations (processes, libraries, hardware per resume). Resume the run "
                         "once with this version (--resume auto); later intervals can then be "
                         "verified.")
    return manifest


def read_log(run_dir):
    """{step: record} of RUN/log.jsonl's training lines; {} where there is none. A zero-shot
    line (--zeroshot-every) shares its step with a training line and is not one: left out."""
    records = read_log_records(os.path.join(run_dir, "log.jsonl"))
    return {record["step"]: record for record in records if "zero_shot" not in record}


def saved_steps(run_dir):
    """{step: path} of RUN/checkpoints/step_N.pt."""
    return dict(step_checkpoints(os.path.join(run_dir, "checkpoints")))


def read_checkpoint(path, name=None):
    """A step checkpoint of train.py; a damaged one is refused in one line naming it `name`
    (the file in the run folder, where `path` is a link to it)."""
    try:
        checkpoint = read_weights_file(path)
    except UsageError as e:
        reason = str(e).removeprefix(f"{path}: ")
        raise UsageError(f"{name or path}: {reason} It is damaged: verify other steps "
                         "(--from-step, --to-step).")
    if not isinstance(checkpoint, dict) or not {"model", "optimizer", "step"} <= set(checkpoint):
        raise UsageError(f"{name or path}: not a checkpoint of train.py (no model, optimizer and "
                         "step). Verify other steps (--from-step, --to-step).")
    return checkpoint


# ----------------------------------------------------------------------------- tensors and logs

def parameter_names(model_state, optimizer_state):
    """{optimizer index: parameter name}. train.make_optimizer puts the weights of 2 or more
    dimensions in its first group and the rest in the second, each in the model's order (whose
    state dict holds parameters alone); where that does not fit, the index stays unnamed."""
    groups = optimizer_state["param_groups"]
    decayed = [name for name, tensor in model_state.items() if tensor.ndim >= 2]
    not_decayed = [name for name, tensor in model_state.items() if tensor.ndim < 2]
    names = {}
    if len(groups) == 2:
        for group, members in zip(groups, [decayed, not_decayed]):
            if len(group["params"]) == len(members):
                names.update(zip(group["params"], members))
    return names


def checkpoint_tensors(checkpoint):
    """{name: tensor}: the weights, and Adam's moments and step count per parameter, named
    'exp_avg of visual.proj'."""
    tensors = dict(checkpoint["model"])
    optimizer = checkpoint["optimizer"]
    names = parameter_names(checkpoint["model"], optimizer)
    for index, state in optimizer["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{key} of {names.get(index, f'parameter {index}')}"] = value
    return tensors


def relative_difference(a, b):
    """max |a - b| / max |b| over one tensor (its absolute difference where b is all zeros)."""
    a = a.double()
    b = b.double()
    difference = (a - b).abs().max().item()
    scale = b.abs().max().item()
    return difference / scale if scale else difference


def compare_checkpoints(there, here):
    """(tensors compared, [(name, max relative difference)] of those not bitwise equal, the
    largest first); a tensor on one side alone, or of another shape, differs by inf."""
    a = checkpoint_tensors(there)
    b = checkpoint_tensors(here)
    differing = []
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b or a[name].shape != b[name].shape:
            differing.append((name, float("inf")))
        elif not torch.equal(a[name], b[name]):
            differing.append((name, relative_difference(b[name], a[name])))
    differing.sort(key=lambda pair: -pair[1])
    return len(set(a) | set(b)), differing


def first_log_difference(there, here, steps, fields):
    """(step, field, value there, value here) of the first of `steps` whose `fields` differ
    between two logs, or None."""
    for step in steps:
        for field in fields:
            if there[step].get(field) != here[step].get(field):
                return step, field, there[step].get(field), here[step].get(field)
    return None


def describe_tensors(count, differing, shown=5):
    """Lines that say which tensors differ, and by how much."""
    if not differing:
        return [f"weights and optimizer moments: {count} tensors, bit-identical"]
    lines = [f"weights and optimizer moments: {len(differing)} of {count} tensors differ "
             "(max |a - b| / max |b|):"]
    lines += [f"  {name}: {difference:.3g}" for name, difference in differing[:shown]]
    if len(differing) > shown:
        lines.append(f"  and {len(differing) - shown} more")
    return lines


# ----------------------------------------------------------------------------- recorded facts

def invocations(manifest, first_step=0, last_step=None):
    """The history's entries of the invocations that trained a step in (first_step, last_step]."""
    entries = []
    for entry in manifest["history"]:
        ended = entry.get("to_step")
        began = entry.get("from_step", 0)
        if (ended is None or ended > first_step) and (last_step is None or began < last_step):
            entries.append(entry)
    return entries or manifest["history"][-1:]


SPLIT = "processes x batch x accumulation"  # the fact that names an invocation's split


def split(entry):
    """(processes, --batch-size, --accum-steps) of an invocation."""
    return entry.get("world_size"), entry.get("batch_size"), entry.get("accum_steps")


def over(entries, value):
    """The values of `value(entry)` over the entries, in order, each once: 'a then b'."""
    seen = []
    for entry in entries:
        if value(entry) not in seen:
            seen.append(value(entry))
    return " then ".join(str(v) for v in seen)


def recorded_facts(manifest, entries):
    """{fact: value}: what can change the bits, as the manifest recorded it for the invocations
    `entries` (RULE 9), under the names the verdicts print."""
    # RULE 9: the manifest read back: each fact that could change the bits, to compare.
    train_data = manifest.get("train_data", {})

    def commit(entry):
        git = entry.get("git", {})
        return f"{git.get('commit')}{' with uncommitted changes' if git.get('dirty') else ''}"

    def device(entry):
        d = entry.get("device", {})
        parts = [d.get("type"), d.get("cpu_model") or d.get("cpu"), *(d.get("gpus") or [])]
        return ", ".join(str(part) for part in parts if part)

    facts = {"training data (CSV sha256)": train_data.get("sha256"),
             "image files (fingerprint)": (train_data.get("images") or {}).get("sha256"),
             "tokenizer (sha256)": manifest.get("tokenizer", {}).get("sha256"),
             "git commit": over(entries, commit)}
    libraries = sorted({name for entry in entries for name in entry.get("versions", {})})
    for library in libraries:
        facts[f"versions.{library}"] = over(entries, lambda e: e["versions"].get(library))
    facts["device and its model"] = over(entries, device)
    facts["threads per process"] = over(entries, lambda e: e.get("device", {})
                                        .get("torch_threads"))
    facts[SPLIT] = over(entries, lambda e: " x ".join(map(str, split(e))))
    return facts


def split_promise(args, splits):
    """(whether RULE 3 promises the same bits across these splits, why)."""
    # RULE 3: the recorded guarantee decides whether another split may give other bits.
    if len({batch for _, batch, _ in splits}) > 1:
        return False, "another --batch-size: RULE 3 promises only float rounding"
    defaults = vars(make_parser().parse_args([]))  # for flags newer than the manifest
    for world, _, accum in splits:
        split_args = types.SimpleNamespace(**{**defaults, **args, "accum_steps": accum})
        guarantee = world_size_guarantee(split_args, world)
        if guarantee["level"] != "bitwise":
            return False, f"RULE 3 promises no bits across these splits: {guarantee['why']}"
    return True, "RULE 3 promises the same bits for these power-of-two splits"


# What can change the bits, the likeliest first, and why. The split's place depends on RULE 3.
CAUSES = [
    ("training data", "other rows train"),
    ("image files", "other pixels train"),
    ("tokenizer", "other token ids"),
    ("git commit", "other code"),
    ("processes x batch", None),
    ("versions.", "another library version is expected to give other bits"),
    ("device", "another device or model runs other kernels: expected to give other bits"),
    ("threads per process", "other threads per process may add in another order"),
]


def likeliest_causes(there, here, args, splits):
    """['fact: A there, B here: why'] for each recorded fact that differs, the likeliest cause
    of other bits first."""
    promised, why_split = split_promise(args, splits)
    ranked = []
    for fact in there.keys() | here.keys():
        if there.get(fact) == here.get(fact):
            continue
        if there.get(fact) is None:  # a manifest of an older version: nothing to compare with
            ranked.append((len(CAUSES) + 1, f"{fact}: not recorded there"))
            continue
        rank, why = next((i, why) for i, (prefix, why) in enumerate(CAUSES)
                         if fact.startswith(prefix))
        if why is None:  # the split: a likely cause unless RULE 3 promises its bits
            rank = len(CAUSES) if promised else rank
            why = why_split
        ranked.append((rank, f"{fact}: {there.get(fact)!r} there, {here.get(fact)!r} here: "
                             f"{why}"))
    return [line for _, line in sorted(ranked)]


# ----------------------------------------------------------------------------- two runs

NOT_COMPARED = {"started", "finished", "startup_seconds", "wall_time_s", "command", "output_dir",
                "resume", "host"}  # when, where and how it was typed: no bits


def flatten(value, prefix=""):
    """{'train_data.sha256': ..., 'history[1].world_size': ...}: the leaves of a manifest."""
    if isinstance(value, dict):
        items = [(f"{prefix}.{key}" if prefix else str(key), v) for key, v in value.items()]
    elif isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        items = [(f"{prefix}[{i}]", v) for i, v in enumerate(value)]
    else:
        return {prefix: value}
    flat = {}
    for key, v in items:
        flat.update(flatten(v, key))
    return flat


ABSENT = object()  # a key one manifest lacks: printed as such, not as a value


def manifest_differences(a, b):
    """[(key, value in a, value in b)] of the manifests' leaves that differ."""
    flat_a = flatten(a)
    flat_b = flatten(b)
    rows = []
    for key in sorted(flat_a.keys() | flat_b.keys()):
        parts = set(key.replace("[", ".").split("."))
        if parts & NOT_COMPARED or key == "tokenizer.path" or flat_a.get(key) == flat_b.get(key):
            continue
        rows.append((key, flat_a.get(key, ABSENT), flat_b.get(key, ABSENT)))
    return rows


def configuration(manifest):
    """{key: value} of what makes a configuration: the flags a resume must match (RULE 8), the
    global batch and the training data; the split of the batch and the bookkeeping are not."""
    args = manifest["args"]
    config = {flag_name(name): args.get(name) for name in MUST_MATCH_ON_RESUME}
    config["global batch"] = manifest.get("global_batch_size")
    config["training data sha256"] = manifest.get("train_data", {}).get("sha256")
    return config


def shorten(value, width=34):
    """A value as the table prints it: JSON, cut to `width` characters."""
    text = "(absent)" if value is ABSENT else json.dumps(value)
    return text if len(text) <= width else text[:width - 1] + "…"


def compare_saved_steps(run_a, run_b):
    """Lines for the checkpoints at the steps both runs kept; and whether all were identical."""
    steps_a = saved_steps(run_a)
    steps_b = saved_steps(run_b)
    lines = []
    identical = True
    for step in sorted(steps_a.keys() & steps_b.keys()):
        count, differing = compare_checkpoints(read_checkpoint(steps_a[step]),
                                               read_checkpoint(steps_b[step]))
        identical = identical and not differing
        if differing:
            name, difference = differing[0]
            lines.append(f"checkpoint step {step}: {len(differing)} of {count} tensors differ, "
                         f"max relative difference {difference:.3g} ({name})")
        else:
            lines.append(f"checkpoint step {step}: {count} tensors, bit-identical")
    if not lines:
        lines.append(f"checkpoints: no common step (kept: {sorted(steps_a)} and "
                     f"{sorted(steps_b)})")
    return lines, identical and bool(steps_a.keys() & steps_b.keys())


def compare_losses(run_a, run_b):
    """A line for the losses at the steps both runs logged; and whether they all agree."""
    log_a = read_log(run_a)
    log_b = read_log(run_b)
    steps = sorted(log_a.keys() & log_b.keys())
    if not steps:
        return "losses: no common logged step", False
    found = first_log_difference(log_a, log_b, steps, ["loss"])
    if found:
        step, _, loss_a, loss_b = found
        return f"losses: {len(steps)} common logged steps; the first that differs is step " \
               f"{step} ({loss_a!r} and {loss_b!r})", False
    return f"losses: {len(steps)} common logged steps, identical", True


def explain_runs(run_a, run_b):
    """`verify.py RUN_A RUN_B`: print what differs, and the verdict; 0 for the same bits."""
    a = read_manifest(run_a)
    b = read_manifest(run_b)
    rows = manifest_differences(a, b)
    print(f"what differs in the manifests: {len(rows)} entries" + (":" if rows else ""))
    if rows:
        width = max(len(key) for key, _, _ in rows)
        print(f"  {'':{width}s}  {'A: ' + str(run_a):34s}  B: {run_b}")
        for key, value_a, value_b in rows:
            print(f"  {key:{width}s}  {shorten(value_a):34s}  {shorten(value_b)}")
    checkpoint_lines, same_checkpoints = compare_saved_steps(run_a, run_b)
    loss_line, same_losses = compare_losses(run_a, run_b)
    print("\n".join(checkpoint_lines + [loss_line]))
    config_a = configuration(a)
    config_b = configuration(b)
    changed = [f"{key} {config_a.get(key)!r} and {config_b.get(key)!r}"
               for key in config_a if config_a.get(key) != config_b.get(key)]
    if changed:
        print(f"verdict: another configuration: {'; '.join(changed)}")
        return 1
    if same_checkpoints and same_losses:
        print("verdict: the same bits")
        return 0
    splits = [split(e) for e in a["history"] + b["history"]]
    causes = likeliest_causes(recorded_facts(a, a["history"]), recorded_facts(b, b["history"]),
                              a["args"], splits)
    cause = causes[0] if causes else "none recorded: the manifests agree in all that is recorded"
    print(f"verdict: the same configuration but other bits; likeliest cause: {cause}")
    for other in causes[1:]:
        print(f"  also: {other}")
    return 1
