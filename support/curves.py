"""A run's or a study's curves from log.jsonl: loss, learning rate, temperature and the zero-shot
accuracies (train.py --zeroshot-every) against the step, one colour per configuration, each seed
a thin line and the mean ± sample std over seeds a band, so that a reader sees where seeds part
ways. `python grid.py curves RUN [RUN ...] --figure PNG` draws it."""
import os

import numpy as np

from support.errors import UsageError
from support.study import group_runs
from support.training_log import read_log as read_log_records

PANELS = [("loss", "training loss"), ("lr", "learning rate"),
          ("logit_scale", "temperature exp(logit_scale)")]


def read_log(run):
    """{name: {step: value}} of RUN/log.jsonl: the logged values and each zero-shot task's."""
    path = os.path.join(run, "log.jsonl")
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such file; pass run folders of train.py.")
    series = {}
    for record in read_log_records(path):
        values = {name: record[name] for name, _ in PANELS if name in record}
        for task, accuracy in record.get("zero_shot", {}).items():
            values[f"zero-shot {task}"] = accuracy
        for name, value in values.items():
            series.setdefault(name, {})[record["step"]] = value
    return series


def mean_and_spread(curves):
    """(steps every seed logged, mean, sample std or None for one seed) of {seed: {step: v}}."""
    steps = sorted(set.intersection(*[set(curve) for curve in curves]))
    values = np.array([[curve[step] for step in steps] for curve in curves])
    spread = values.std(axis=0, ddof=1) if len(curves) > 1 else None
    return steps, values.mean(axis=0), spread


def panel_names(logs):
    names = [name for name, _ in PANELS]
    tasks = sorted({name for log in logs.values() for name in log if name.startswith("zero-")})
    return names + tasks


def draw_curves(runs, path):
    """The figure of `runs` (run folders), grouped into configurations as evaluate.py --runs
    groups them (RULE 12), saved to `path`; returns the matplotlib Figure."""
    from matplotlib.figure import Figure  # only when a figure is drawn; no display needed
    groups = group_runs(runs)
    logs = {run: read_log(run) for run in runs}
    names = panel_names(logs)
    titles = dict(PANELS)
    columns = min(3, len(names))
    rows = -(-len(names) // columns)
    figure = Figure(figsize=(4.2 * columns, 3.0 * rows + 0.8), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for colour, group in zip(colours(len(groups)), groups):
        for ax, name in zip(axes, names):
            curves = [logs[run][name] for run in group["runs"] if name in logs[run]]
            if not curves:
                continue
            for curve in curves:  # each seed a thin line
                ax.plot(list(curve), list(curve.values()), color=colour, linewidth=0.7,
                        alpha=0.45)
            steps, mean, spread = mean_and_spread(curves)
            ax.plot(steps, mean, color=colour, linewidth=1.8,
                    label=f"{group['label']} ({len(curves)} seed{'s' * (len(curves) > 1)})")
            if spread is not None:
                ax.fill_between(steps, mean - spread, mean + spread, color=colour, alpha=0.2,
                                linewidth=0)
    for ax, name in zip(axes, names):
        ax.set_title(titles.get(name, f"{name} accuracy"), fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    columns = 1 if max(map(len, labels)) > 40 else min(3, len(labels))  # long labels: a list
    figure.legend(handles, labels, loc="outside lower center", ncols=columns, fontsize=8,
                  title="a colour per configuration: thick line the mean over seeds, band "
                  "± sample std, thin lines one seed each", title_fontsize=8)
    figure.savefig(path, dpi=120)
    return figure


def colours(count):
    """`count` colours of matplotlib's default cycle (tab10), repeated past ten."""
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown",
               "tab:pink", "tab:gray", "tab:olive", "tab:cyan"]
    return [palette[i % len(palette)] for i in range(count)]
