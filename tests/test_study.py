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
from PIL import Image

import evaluate
from support import study

H100 = {"type": "cuda", "torch_threads": 8, "cpu": "x86_64", "gpus": ["NVIDIA H100"]}
A100 = {"type": "cuda", "torch_threads": 8, "cpu": "x86_64", "gpus": ["NVIDIA A100"]}


def write_colon(root):
    """The smallest LC25000-Colon: two JPEGs per class (the evaluation itself is faked)."""
    for name in evaluate.TASKS["lc25000_colon"]:
        os.makedirs(root / "colon_image_sets" / name)
        for i in range(2):
            path = root / "colon_image_sets" / name / f"{name}{i + 1}.jpeg"
            Image.new("RGB", (32, 32), (200, 100, 150)).save(path)


def run_study(tmp_path, monkeypatch, runs, figure=None):
    """Fake run folders from `runs`, [(manifest changes, zero-shot score)], studied by
    evaluate.main; returns results.json (the table goes to stdout)."""
    write_colon(tmp_path / "lc")
    folders = []
    scores = {}
    for i, (changes, score) in enumerate(runs):
        run = tmp_path / f"run{i}"
        os.makedirs(run / "checkpoints")
        (run / "checkpoints" / "latest.pt").write_bytes(f"weights {i}".encode())
        args = {"model": "tiny", "lr": 5e-4, "batch_size": 8, "seed": i, "output_dir": str(run)}
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
    flags = ["--runs", *folders, "--dataset", f"lc25000_colon={tmp_path / 'lc'}",
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
