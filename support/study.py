"""The multi-seed study of `evaluate.py --runs`: runs pooled into configurations, mean ± sample
std over seeds (RULE 10), the most reproducible benchmark (RULE 11), Welch intervals and the
seeds needed for every two configurations one setting apart, the table and the figure."""
import itertools
import json
import math
import os

import numpy as np

from support.errors import UsageError
from support.files import read_json, write_json
from support.image_sets import LC25000_NOTE, LC25000_SUBFOLDER

METRICS = ["accuracy", "balanced_accuracy", "weighted_f1"]
METHODS = {"zero_shot": "zero-shot", "linear_probe": "linear probe"}
HEADLINE = "balanced_accuracy"  # what "most reproducible", comparisons and the figure judge



# Flags that do not make another configuration: the seed, the run's own paths, and bookkeeping
# that cannot change a result (workers: RULE 2), the first invocation's included (manifest args).
NOT_CONFIGURATION = {"seed", "output_dir", "resume", "workers", "log_every", "save_every",
                     "stop_at_step", "dist_timeout", "zeroshot_every", "zeroshot_data"}


CONFIDENCE = 0.95  # of the interval around a difference between two configurations


ALPHA = 0.05       # the two-sided test behind "seeds needed", and its power


POWER = 0.8


MAX_SEEDS = 1000   # "seeds needed" beyond this: the difference is too small for a study to resolve


def finished_runs(runs):
    """The run folders that can be studied; each other one is named, with the reason, and
    skipped: a run that failed at its start leaves an empty checkpoints/ or no manifest."""
    kept = []
    for run in runs:
        missing = [name for name in ("manifest.json", os.path.join("checkpoints", "latest.pt"))
                   if not os.path.isfile(os.path.join(run, name))]
        if missing:
            print(f"skipping {run}: no {' and no '.join(missing)} (a run of train.py that "
                  "stopped before its first checkpoint, or no run folder)")
        else:
            kept.append(run)
    if not kept:
        raise UsageError(f"--runs: none of the {len(runs)} folders holds manifest.json and "
                         "checkpoints/latest.pt; pass the run folders of train.py.")
    return kept


def group_runs(runs):
    """[{label, runs, configuration, hardware}]: the runs pooled over seeds. A label names what
    tells the configurations apart ("rrc_scale=0.6")."""
    groups = {}
    for run in runs:
        where = f"--runs {run} (expected a run folder of train.py)"
        manifest = read_json(os.path.join(run, "manifest.json"), where)
        # RULE 12: one configuration = the same flags (but NOT_CONFIGURATION), global batch (the
        # world size is no flag, yet it sets the batch), data, code and libraries.
        key = {k: v for k, v in manifest["args"].items() if k not in NOT_CONFIGURATION}
        key["global_batch_size"] = manifest.get("global_batch_size")
        train_data = manifest.get("train_data", {})
        key["train_data_sha256"] = train_data.get("sha256")
        key["train_data_split_filter"] = train_data.get("split_filter")
        key["git_commit"] = manifest.get("git", {}).get("commit")
        for library, version in manifest.get("versions", {}).items():
            key[f"{library}_version"] = version
        group = groups.setdefault(json.dumps(key, sort_keys=True), {"configuration": key})
        # The machine is no setting, but it can change bits: shown where it differs in a group.
        device = manifest.get("device") or {}
        machine = ", ".join(f"{k}={device[k]}" for k in sorted(device)) or "not recorded"
        group.setdefault("hardware", {})[run] = machine
    configurations = [group["configuration"] for group in groups.values()]
    differing = sorted(k for k in set().union(*configurations)
                       if len({json.dumps(c.get(k)) for c in configurations}) > 1)
    for group in groups.values():
        labels = [f"{k}={group['configuration'].get(k)}" for k in differing]
        group["label"] = ", ".join(labels) or "all runs"
        group["runs"] = list(group["hardware"])
    return list(groups.values())


def summarise(values):
    """Mean, sample standard deviation (undefined for one run), min and max over seeds."""
    v = np.asarray(values, dtype=np.float64)
    # RULE 10: mean ± sample std (ddof=1, the usual "± std over seeds") — see RULES.md
    std = float(v.std(ddof=1)) if len(v) > 1 else None
    return {"n": len(v), "mean": float(v.mean()), "std": std,
            "min": float(v.min()), "max": float(v.max()), "values": v.tolist()}


def study(groups, results):
    """Per configuration: its runs, and the summary over seeds of each dataset, method, metric."""
    configurations = []
    for group in groups:
        members = group["runs"]
        summary = {}
        for task in results[members[0]]["datasets"]:
            summary[task] = {}
            for method in METHODS:
                scores = [results[run]["datasets"][task][method] for run in members]
                summary[task][method] = {metric: summarise([s[metric] for s in scores])
                                         for metric in METRICS}
        most_reproducible = None
        if len(members) > 1:
            # RULE 11: name the benchmark whose headline score varies least across seeds.
            stds = {task: s["zero_shot"][HEADLINE]["std"] for task, s in summary.items()}
            most = min(stds, key=stds.get)
            most_reproducible = {"dataset": most, "std": stds[most]}
        configurations.append({**group, "summary": summary,
                               "most_reproducible": most_reproducible})
    return configurations


def seeds_needed(difference, std):
    """Seeds per configuration for a two-sided two-sample t-test at ALPHA to detect `difference`
    with probability POWER when runs scatter with standard deviation `std`; None past MAX_SEEDS.
    The power is Student's exact one (noncentral t): d = 0.5 needs 64, d = 0.8 26 (Cohen)."""
    if std == 0:  # no noise at all: two seeds a side show any difference
        return 2 if difference else None
    from scipy import stats  # here, not at the top: every train.py start would pay ~1 s for it
    effect = abs(difference) / std  # Cohen's d
    n = np.arange(2, MAX_SEEDS + 1)  # every study size at once
    df = 2 * n - 2
    critical = stats.t.ppf(1 - ALPHA / 2, df)
    shift = effect * np.sqrt(n / 2)
    power = stats.nct.sf(critical, df, shift) + stats.nct.cdf(-critical, df, shift)
    enough = n[power >= POWER]
    if len(enough) == 0:
        return None
    return int(enough[0])


def compare(a, b):
    """b's mean minus a's, its CONFIDENCE interval over seeds by Welch's t, whether the interval
    excludes 0 (the difference exceeds the seeds' noise), and the seeds that would resolve it."""
    a = np.asarray(a["values"])
    b = np.asarray(b["values"])
    difference = float(b.mean() - a.mean())
    result = {"seeds": [len(a), len(b)], "difference": difference, "interval": None,
              "beyond_seed_noise": None, "pooled_std": None, "seeds_needed": None}
    if min(len(a), len(b)) < 2:
        return {**result, "note": "needs >= 2 seeds"}
    var_a = a.var(ddof=1) / len(a)  # the squared standard errors of the two means
    var_b = b.var(ddof=1) / len(b)
    interval = [difference, difference]  # no spread at all: no noise to exceed
    if var_a + var_b > 0:
        from scipy import stats  # as in seeds_needed
        # Welch's t: the two spreads may differ; Welch-Satterthwaite's degrees of freedom.
        df = (var_a + var_b) ** 2 / (var_a ** 2 / (len(a) - 1) + var_b ** 2 / (len(b) - 1))
        half = stats.t.ppf((1 + CONFIDENCE) / 2, df) * math.sqrt(var_a + var_b)
        interval = [difference - float(half), difference + float(half)]
    squares = (len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)
    pooled_std = math.sqrt(squares / (len(a) + len(b) - 2))
    return {**result, "interval": interval, "beyond_seed_noise": interval[0] > 0 or interval[1] < 0,
            "pooled_std": pooled_std, "seeds_needed": seeds_needed(difference, pooled_std)}


def comparisons(configurations):
    """The study's question: for every two configurations that differ in ONE setting, per dataset
    and method, is the difference in the headline metric larger than the seeds' noise?"""
    found = []
    for a, b in itertools.combinations(configurations, 2):
        keys = sorted(set(a["configuration"]) | set(b["configuration"]))
        changed = [k for k in keys if a["configuration"].get(k) != b["configuration"].get(k)]
        if len(changed) != 1:
            continue
        setting = changed[0]
        for task in a["summary"]:
            for method in METHODS:
                found.append({"setting": setting, "from": a["configuration"].get(setting),
                              "to": b["configuration"].get(setting), "a": a["label"],
                              "b": b["label"], "dataset": task, "method": method,
                              **compare(a["summary"][task][method][HEADLINE],
                                        b["summary"][task][method][HEADLINE])})
    return found


def cell(s):
    """One run's score, or mean ± sample std (min–max) over seeds."""
    if s["n"] == 1:
        return f"{s['mean']:.3f}"
    return f"{s['mean']:.3f} ± {s['std']:.3f} ({s['min']:.3f}–{s['max']:.3f})"


def print_table(configurations):
    """Per dataset, a row per configuration and method; then what a reader must know besides."""
    tasks = list(configurations[0]["summary"])
    width = max(len(name) for name in [c["label"] for c in configurations] + tasks) + 2
    metrics = " ".join(f"{m:28s}" for m in METRICS)
    for task in tasks:
        print(f"\n{task:{width}s} seeds  {'method':13s} {metrics}")
        for c in configurations:
            head = f"{c['label']:{width}s} {len(c['runs']):5d}"
            for method, title in METHODS.items():
                scores = " ".join(f"{cell(c['summary'][task][method][m]):28s}" for m in METRICS)
                print(f"{head}  {title:13s} {scores}")
                head = " " * (width + 6)  # the label and the number of seeds once
        if task in LC25000_SUBFOLDER:
            print(f"note on the linear probe: {LC25000_NOTE}.")
    for c in configurations:
        most = c["most_reproducible"]
        if most:
            print(f"{c['label']}: most reproducible benchmark {most['dataset']} "
                  f"(lowest std of zero-shot {HEADLINE}: {most['std']:.4f})")
        machines = sorted(set(c["hardware"].values()))
        if len(machines) > 1:
            print(f"{c['label']}: its runs trained on different hardware: {' | '.join(machines)}")


def print_comparisons(found):
    """A line per comparison: the difference, its interval and the verdict."""
    if not found:
        return
    print(f"\nOne setting apart: difference of mean {HEADLINE} over seeds, "
          f"{CONFIDENCE:.0%} Welch interval; seeds per configuration that would resolve it "
          f"(alpha {ALPHA}, power {POWER})")
    changes = [f"{c['setting']} {c['from']} -> {c['to']}" for c in found]
    width = max(map(len, changes))
    for c, change in zip(found, changes):
        head = f"{change:{width}s}  {c['dataset']:14s} {METHODS[c['method']]:13s}"
        if c["interval"] is None:
            print(f"{head} {c['difference']:+.3f}  ({c['note']})")
            continue
        low, high = c["interval"]
        verdict = "beyond seed noise" if c["beyond_seed_noise"] else "within seed noise"
        needed = c["seeds_needed"] or f"> {MAX_SEEDS}"
        print(f"{head} {c['difference']:+.3f} [{low:+.3f}, {high:+.3f}]  {verdict:17s}  "
              f"{needed} seeds each to resolve")


SEED_DOTS = dict(color="tab:blue", alpha=0.7)  # one seed's score
POSSIBLE = (-1, 1)  # what a difference of two accuracies can be: an interval is clipped to it


def draw_scores(ax, configurations, task, method):
    """A row per configuration: its seeds' scores as dots, mean ± sample std as a bar below them.
    Returns every x drawn, and the artists the legend shows."""
    drawn = []
    for y, c in enumerate(configurations):
        s = c["summary"][task][method][HEADLINE]
        seeds = ax.scatter(s["values"], np.full(s["n"], y - 0.15), s=14, **SEED_DOTS)
        spread = s["std"] or 0  # None for one run: no bar
        bar = ax.errorbar(s["mean"], y + 0.15, xerr=spread, fmt="o", color="black", capsize=3)
        drawn += s["values"] + [s["mean"] - spread, s["mean"] + spread]
    return drawn, {"one seed's score": seeds, "mean ± sample std over seeds": bar}


def draw_differences(ax, found):
    """A row per comparison: the difference of means as a dot, its interval as a line, red where
    it excludes 0 (beyond the seeds' noise), cut at POSSIBLE with an arrowhead where cut.
    Returns every x drawn."""
    drawn = [0.0]
    for y, c in enumerate(found):
        colour = "tab:red" if c["beyond_seed_noise"] else "grey"
        if c["interval"]:  # none with fewer than 2 seeds on a side: a dot alone
            low, high = np.clip(c["interval"], *POSSIBLE)
            ax.plot([low, high], [y, y], color=colour)
            if c["interval"][0] < POSSIBLE[0]:
                ax.plot(low, y, marker="<", color=colour)
            if c["interval"][1] > POSSIBLE[1]:
                ax.plot(high, y, marker=">", color=colour)
            drawn += [low, high]
        ax.scatter([c["difference"]], [y], color=colour, s=14)
        drawn.append(c["difference"])
    ax.axvline(0, color="black", linewidth=0.5)
    return drawn


def set_row_range(axes, drawn):
    """One x-range for a row of panels (they share it), every mark inside with a margin: no
    seed on an edge, where it would read as cut off."""
    low = min(drawn)
    high = max(drawn)
    margin = max(0.08 * (high - low), 0.01)
    axes[0].set_xlim(low - margin, high + margin)


def legend_handles(score_artists, found):
    """What each mark means, for the legend under the figure: {label: artist}."""
    from matplotlib.lines import Line2D
    handles = dict(score_artists)
    if found:
        within = f"difference of means, {CONFIDENCE:.0%} Welch interval: within seed noise"
        handles[within] = Line2D([], [], color="grey", marker="o")
        handles["the same, beyond seed noise"] = Line2D([], [], color="tab:red", marker="o")
    low, high = POSSIBLE
    if any(c["interval"] and not low <= c["interval"][0] <= c["interval"][1] <= high
           for c in found):
        handles[f"interval cut at {low} or +{high}"] = Line2D(
            [], [], color="grey", marker=">", linestyle="none")
    return handles


def draw_figure(configurations, found, path):
    """Per method and dataset a panel, a row per configuration: seeds as dots, mean ± std a bar;
    below, per dataset, each comparison's difference and interval (crossing 0: seed noise). Each
    row of panels shares one x-scale; a legend says what the marks are. Returns the Figure."""
    from matplotlib.figure import Figure  # imported only when a figure is drawn; no display needed
    tasks = list(configurations[0]["summary"])
    labels = [c["label"] for c in configurations]
    pairs = [f"{c['setting']} {c['from']}→{c['to']}, {METHODS[c['method']]}"
             for c in found if c["dataset"] == tasks[0]]
    legend_columns = min(2, len(tasks))  # one panel wide: the legend's lines one under another
    size = (3 * len(tasks) + 0.07 * max(map(len, labels + pairs)),
            1.5 + 0.7 * len(labels) + 0.3 * len(pairs) + 0.9 / legend_columns)
    figure = Figure(figsize=size, layout="constrained")
    axes = figure.subplots(len(METHODS) + bool(pairs), len(tasks), squeeze=False, sharex="row")
    headline = HEADLINE.replace("_", " ")
    for row, (method, title) in enumerate(METHODS.items()):
        drawn = []
        for ax, task in zip(axes[row], tasks):
            marks, artists = draw_scores(ax, configurations, task, method)
            drawn += marks
            ax.set_title(f"{task}, {title}", fontsize=9)
            ax.set_xlabel(f"{title} {headline}", fontsize=8)
        set_row_range(axes[row], drawn)
    if pairs:
        drawn = []
        for ax, task in zip(axes[-1], tasks):
            drawn += draw_differences(ax, [c for c in found if c["dataset"] == task])
            ax.set_title(f"{task}: one setting apart", fontsize=9)
            ax.set_xlabel(f"mean {headline} after → minus before", fontsize=8)
        set_row_range(axes[-1], drawn)
    for row, names in enumerate([labels] * len(METHODS) + [pairs] * bool(pairs)):
        for column, ax in enumerate(axes[row]):
            ax.set_yticks(range(len(names)), names if column == 0 else [])
            ax.set_ylim(len(names) - 0.5, -0.5)  # the first on top, as in the table
    handles = legend_handles(artists, found)
    figure.legend(list(handles.values()), list(handles), loc="outside lower center",
                  ncols=legend_columns, fontsize=8)
    figure.savefig(path, dpi=120)
    return figure


def write_results(output, datasets, fingerprints, protocol, configurations, found, results):
    """The study's results.json at `output`; says where."""
    record = {task: {"path": os.path.abspath(root), "fingerprints": fingerprints[task]}
              for task, root in datasets.items()}
    write_json(output, {
        "std": "sample standard deviation over seeds (ddof=1)", "headline_metric": HEADLINE,
        "not_configuration": sorted(NOT_CONFIGURATION), "protocol": protocol,
        "datasets": record, "configurations": configurations, "comparisons": found,
        "runs": results})
    print(f"wrote the study's results to {os.path.abspath(output)}")
