"""evaluate.py --runs as a study: which runs are pooled over seeds (everything that decides a
result but the seed must agree; the machine is shown, not pooled on), and the answer for two
configurations one setting apart: the difference, its Welch interval, whether it exceeds the
seeds' noise, and how many seeds would resolve it. Quick: fake manifests, faked evaluation.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_study.py
"""
import json
import os

import numpy as np
import pytest
import scipy.stats
from matplotlib.collections import PathCollection
from PIL import Image

import evaluate
from support import study
from support.errors import UsageError

H100 = {"type": "cuda", "torch_threads": 8, "cpu": "x86_64", "gpus": ["NVIDIA H100"]}
A100 = {"type": "cuda", "torch_threads": 8, "cpu": "x86_64", "gpus": ["NVIDIA A100"]}


def write_colon(root):
    """The smallest LC25000-Colon: two JPEGs per class (the evaluation itself is faked)."""
    for name in evaluate.TASKS["lc25000_colon"]:
        os.makedirs(root / "colon_image_sets" / name)
        for i in range(2):
            path = root / "colon_image_sets" / name / f"{name}{i + 1}.jpeg"
            Image.new("RGB", (32, 32), (200, 100, 150)).save(path)


def run_study(tmp_path, monkeypatch, runs, figure=None, other_folders=()):
    """Fake run folders from `runs`, [(manifest changes, zero-shot score)], studied by
    evaluate.main with `other_folders` among them; returns results.json (the table goes to
    stdout)."""
    write_colon(tmp_path / "lc")
    folders = []
    scores = {}
    for i, (changes, score) in enumerate(runs):
        run = tmp_path / f"run{i}"
        os.makedirs(run / "checkpoints")
        (run / "checkpoints" / "latest.pt").write_bytes(f"weights {i}".encode())
        args = {"model": "tiny", "lr": 5e-4, "batch_size": 8, "seed": i, "output_dir": str(run),
                "stop_at_step": None, "dist_timeout": 60, "zeroshot_every": 0}
        manifest = {"args": args, "seed": i, "world_size": 1, "global_batch_size": 8,
                    "train_data": {"sha256": "ab12", "split_filter": "train"},
                    "git": {"commit": "c0ffee", "dirty": False},
                    "versions": {"torch": "2.4.0"}, "device": H100}
        for key, value in changes.items():
            if key in args:
                args[key] = value
            else:
                manifest[key] = value
        (run / "manifest.json").write_text(json.dumps(manifest))
        folders.append(str(run))
        scores[os.path.abspath(run / "checkpoints" / "latest.pt")] = score

    def fake_evaluate_checkpoint(checkpoint, request, datasets, tasks, args):
        score = scores[os.path.abspath(checkpoint)]
        zero_shot = {metric: score for metric in study.METRICS}
        probe = {metric: score + 0.05 for metric in study.METRICS}
        methods = {"zero_shot": zero_shot, "linear_probe": probe}
        return {**request, "datasets": {task: methods for task in datasets}}
    monkeypatch.setattr(evaluate, "evaluate_checkpoint", fake_evaluate_checkpoint)
    output = tmp_path / "results.json"
    flags = ["--runs", *folders, *map(str, other_folders),
             "--dataset", f"lc25000_colon={tmp_path / 'lc'}",
             "--output", str(output)]
    if figure:
        flags += ["--figure", str(figure)]
    evaluate.main(flags)
    return json.loads(output.read_text())


def comparison(results, method="zero_shot"):
    [found] = [c for c in results["comparisons"] if c["method"] == method]
    return found


def test_runs_of_one_command_on_one_and_two_gpus_are_not_pooled(tmp_path, monkeypatch):
    # World size is no flag, but 2 GPUs double the global batch: another configuration.
    two_gpus = {"world_size": 2, "global_batch_size": 16}
    results = run_study(tmp_path, monkeypatch, [
        ({}, 0.80), ({}, 0.81), (two_gpus, 0.82), (two_gpus, 0.83)])
    sizes = {c["label"]: len(c["runs"]) for c in results["configurations"]}
    assert sizes == {"global_batch_size=8": 2, "global_batch_size=16": 2}
    assert comparison(results)["setting"] == "global_batch_size"


def test_runs_that_differ_in_the_seed_alone_are_pooled(tmp_path, monkeypatch):
    results = run_study(tmp_path, monkeypatch, [({}, 0.80), ({}, 0.82), ({}, 0.84)])
    [configuration] = results["configurations"]
    assert configuration["label"] == "all runs" and len(configuration["runs"]) == 3
    assert results["comparisons"] == []


@pytest.mark.parametrize("changes", [
    {"train_data": {"sha256": "other", "split_filter": "train"}},
    {"train_data": {"sha256": "ab12", "split_filter": "all"}},
    {"git": {"commit": "dead", "dirty": False}},
    {"versions": {"torch": "2.5.0"}},
    {"lr": 1e-4}])
def test_data_split_filter_commit_libraries_and_flags_each_make_another_configuration(
        tmp_path, monkeypatch, changes):
    results = run_study(tmp_path, monkeypatch, [({}, 0.80), ({}, 0.81), (changes, 0.80)])
    assert sorted(len(c["runs"]) for c in results["configurations"]) == [1, 2]


def test_a_run_stopped_on_the_way_and_resumed_is_pooled_with_those_that_ran_through(
        tmp_path, monkeypatch):
    """The manifest's args are its first invocation's: --stop-at-step, --dist-timeout and
    --zeroshot-every there end, wait or score, and decide no result."""
    stopped = {"stop_at_step": 100, "dist_timeout": 240, "zeroshot_every": 50}
    results = run_study(tmp_path, monkeypatch, [({}, 0.80), ({}, 0.81), (stopped, 0.82)])
    [configuration] = results["configurations"]
    assert len(configuration["runs"]) == 3


def test_hardware_that_differs_inside_a_configuration_is_shown(tmp_path, monkeypatch, capsys):
    results = run_study(tmp_path, monkeypatch, [
        ({}, 0.80), ({}, 0.81), ({"device": A100}, 0.82)])
    [configuration] = results["configurations"]  # the machine is no setting: pooled
    assert len(set(configuration["hardware"].values())) == 2
    table = capsys.readouterr().out
    assert "different hardware" in table and "A100" in table and "H100" in table


def test_welch_interval_matches_scipy_and_a_large_difference_is_beyond_seed_noise():
    a = [0.80, 0.82, 0.84]
    b = [0.90, 0.93, 0.91, 0.95]
    found = study.compare({"values": a}, {"values": b})
    expected = scipy.stats.ttest_ind(b, a, equal_var=False).confidence_interval(0.95)
    assert found["interval"] == pytest.approx([expected.low, expected.high], abs=1e-12)
    assert found["difference"] == pytest.approx(np.mean(b) - np.mean(a))
    assert found["beyond_seed_noise"] is True
    pooled = np.sqrt((2 * np.var(a, ddof=1) + 3 * np.var(b, ddof=1)) / 5)
    assert found["pooled_std"] == pytest.approx(pooled)


def test_a_difference_smaller_than_the_seed_noise_is_not_flagged():
    found = study.compare({"values": [0.80, 0.86, 0.83]}, {"values": [0.81, 0.85, 0.84]})
    low, high = found["interval"]
    assert low < 0 < high and found["beyond_seed_noise"] is False
    assert found["seeds_needed"] > 100  # 0.003 against a spread of 0.02: hopeless with 3 seeds


def test_seeds_needed_is_the_two_sample_t_test_power_calculation():
    # Cohen's table (two-sided alpha 0.05, power 0.8): d = 0.5 needs 64 per group, d = 0.8 26.
    assert study.seeds_needed(0.05, 0.1) == 64
    assert study.seeds_needed(-0.08, 0.1) == 26
    assert study.seeds_needed(0.0, 0.1) is None


def test_fewer_than_two_seeds_on_a_side_gives_no_interval(tmp_path, monkeypatch, capsys):
    results = run_study(tmp_path, monkeypatch, [({}, 0.80), ({}, 0.81), ({"lr": 1e-4}, 0.9)])
    found = comparison(results)
    assert found["interval"] is None and found["note"] == "needs >= 2 seeds"
    assert "needs >= 2 seeds" in capsys.readouterr().out


def test_results_table_and_figure_hold_the_comparisons(tmp_path, monkeypatch, capsys):
    figure = tmp_path / "study.png"
    results = run_study(tmp_path, monkeypatch, [
        ({}, 0.80), ({}, 0.82), ({}, 0.84),
        ({"lr": 1e-4}, 0.90), ({"lr": 1e-4}, 0.93), ({"lr": 1e-4}, 0.91)], figure=figure)
    found = comparison(results)
    assert (found["setting"], found["from"], found["to"]) == ("lr", 0.0005, 0.0001)
    assert found["dataset"] == "lc25000_colon" and found["seeds"] == [3, 3]
    assert found["difference"] == pytest.approx(0.0933, abs=1e-4)
    assert found["beyond_seed_noise"] is True and found["seeds_needed"] == 3
    assert comparison(results, "linear_probe")["difference"] == pytest.approx(0.0933, abs=1e-4)
    table = capsys.readouterr().out
    assert "One setting apart" in table and "lr 0.0005 -> 0.0001" in table
    assert "beyond seed noise" in table
    # LC25000's augmented siblings leak across a random split: said where the probe is shown.
    assert "1,250 originals" in table
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runs_without_a_checkpoint_or_manifest_are_skipped_and_named(tmp_path, monkeypatch,
                                                                      capsys):
    failed_at_start = tmp_path / "failed"  # what a run that failed at its start leaves
    os.makedirs(failed_at_start / "checkpoints")
    (failed_at_start / "manifest.json").write_text("{}")
    no_manifest = tmp_path / "no_manifest"
    os.makedirs(no_manifest / "checkpoints")
    (no_manifest / "checkpoints" / "latest.pt").write_bytes(b"weights")
    figure = tmp_path / "study.png"
    results = run_study(tmp_path, monkeypatch, [({}, 0.80), ({}, 0.82)], figure=figure,
                        other_folders=[failed_at_start, no_manifest])
    [configuration] = results["configurations"]
    assert len(configuration["runs"]) == 2
    out = capsys.readouterr().out
    assert f"skipping {failed_at_start}: no checkpoints/latest.pt" in out
    assert f"skipping {no_manifest}: no manifest.json" in out
    # where the results and the figure went, as absolute paths
    assert f"wrote the study's results to {tmp_path / 'results.json'}" in out
    assert f"wrote the figure to {figure}" in out


def test_a_study_of_no_usable_run_is_one_line(tmp_path):
    os.makedirs(tmp_path / "failed" / "checkpoints")
    with pytest.raises(UsageError, match="none of the 1 folders holds manifest.json"):
        evaluate.main(["--runs", str(tmp_path / "failed"), "--output",
                       str(tmp_path / "results.json")])


def panels_by_row(figure):
    """The figure's panels as rows (matplotlib keeps them in the order they were made)."""
    axes = [ax for ax in figure.axes if ax.get_subplotspec()]
    rows = axes[0].get_subplotspec().get_gridspec().nrows
    columns = len(axes) // rows
    return [axes[row * columns:(row + 1) * columns] for row in range(rows)]


def test_the_figure_has_a_legend_one_x_range_per_row_and_intervals_cut_at_one(
        tmp_path, monkeypatch):
    # Two seeds far apart: a Welch interval of about -5 to +5, where a difference lies in [-1, 1].
    figure_path = tmp_path / "study.png"
    results = run_study(tmp_path, monkeypatch, [
        ({}, 0.10), ({}, 0.90), ({"lr": 1e-4}, 0.50), ({"lr": 1e-4}, 0.55)])
    low, high = comparison(results)["interval"]
    assert low < -1 and high > 1
    figure = study.draw_figure(results["configurations"], results["comparisons"], figure_path)
    assert figure_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    [legend] = figure.legends
    entries = [text.get_text() for text in legend.get_texts()]
    assert entries[:2] == ["one seed's score", "mean ± sample std over seeds"]
    assert any("95% Welch interval" in entry for entry in entries)
    assert any("cut at -1 or +1" in entry for entry in entries)
    zero_shot, probe, differences = panels_by_row(figure)
    for row, label in ((zero_shot, "zero-shot"), (probe, "linear probe"),
                       (differences, "minus")):
        assert len({ax.get_xlim() for ax in row}) == 1  # one x-scale per row
        assert all(label in ax.get_xlabel() for ax in row)
    for ax in zero_shot + probe:  # every seed inside its panel, none on an edge
        left, right = ax.get_xlim()
        margin = 0.05 * (right - left)
        seeds = np.concatenate([dots.get_offsets()[:, 0] for dots in ax.collections
                                if isinstance(dots, PathCollection)])  # not the std bars
        assert left + margin < seeds.min() and seeds.max() < right - margin
    left, right = differences[0].get_xlim()
    assert -1.2 < left < -1 and 1 < right < 1.2
    for ax in differences:
        ends = np.concatenate([line.get_xdata() for line in ax.lines])
        assert ends.min() >= -1 and ends.max() <= 1
        markers = {line.get_marker() for line in ax.lines}
        assert {"<", ">"} <= markers  # the cut marked at both ends
