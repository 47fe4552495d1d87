"""evaluate.py and the layouts support/image_sets.py reads: the released dataset layouts, the metrics,
zero-shot and the probe on a demo run, and the multi-seed table. Real files in tmp_path: JPEG
folder trees, HDF5 files, run folders with manifests."""
import json
import os
import time

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
from support.errors import UsageError
from support import image_sets
from support.study import METRICS

LC25000_FOLDERS = {"lung_image_sets": ["lung_aca", "lung_n", "lung_scc"],
                   "colon_image_sets": ["colon_aca", "colon_n"]}


def write_lc25000(root, per_class=4):
    """A miniature lung_colon_image_set/: each class's JPEGs are one flat colour, so a label can
    be checked from the pixels. Returns {class folder: colour}."""
    colours = {}
    for subfolder, classes in LC25000_FOLDERS.items():
        for name in classes:
            colour = (40 * len(colours) + 30, 200 - 30 * len(colours), 90)
            colours[name] = colour
            os.makedirs(root / subfolder / name)
            for i in range(per_class):
                path = root / subfolder / name / f"{name}{i + 1}.jpeg"
                Image.new("RGB", (48, 48), colour).save(path, quality=95)
    return colours


def write_pcam(root, split, labels):
    """camelyonpatch_level_2_split_<split>_{x,y}.h5 as released: x (N, 96, 96, 3) uint8,
    y (N, 1, 1, 1). Patch i is filled with the value i, so that a patch can be matched to its
    index."""
    os.makedirs(root, exist_ok=True)
    values = np.arange(len(labels), dtype=np.uint8)[:, None, None, None]
    x = np.broadcast_to(values, (len(labels), 96, 96, 3))
    with h5py.File(root / f"camelyonpatch_level_2_split_{split}_x.h5", "w") as f:
        f.create_dataset("x", data=np.ascontiguousarray(x), chunks=(1, 96, 96, 3))
    with h5py.File(root / f"camelyonpatch_level_2_split_{split}_y.h5", "w") as f:
        f.create_dataset("y", data=np.array(labels, np.uint8).reshape(-1, 1, 1, 1))


def test_lc25000_top_folder_and_subfolder_give_the_same_labelled_images(tmp_path):
    colours = write_lc25000(tmp_path / "lung_colon_image_set")
    for task, subfolder in image_sets.LC25000_SUBFOLDER.items():
        folders = list(evaluate.TASKS[task])
        top = str(tmp_path / "lung_colon_image_set")
        from_top = image_sets.load_dataset(task, top, folders)
        from_sub = image_sets.load_dataset(task, os.path.join(top, subfolder), folders)
        assert from_top.samples == from_sub.samples
        assert from_top.fingerprint == from_sub.fingerprint
        assert len(from_top) == 4 * len(evaluate.TASKS[task])
        for i in range(len(from_top)):
            image, label = from_top[i]
            folder = os.path.basename(os.path.dirname(from_top.samples[i][0]))
            # The label is the folder's position in TASKS, and the pixels agree:
            assert folders[label] == folder
            assert np.abs(np.asarray(image, float)[24, 24] - colours[folder]).max() < 8
    # The explicit folder -> class name table the prompts are built from.
    assert evaluate.TASKS["lc25000_lung"] == {
        "lung_aca": "lung adenocarcinoma", "lung_n": "benign lung",
        "lung_scc": "lung squamous cell carcinoma"}
    assert evaluate.TASKS["lc25000_colon"] == {
        "colon_aca": "colon adenocarcinoma", "colon_n": "benign colonic tissue"}
    assert evaluate.TASKS["pcam"] == {
        "0": "lymph node", "1": "lymph node containing metastatic tumor tissue"}


def test_image_folder_labels_follow_the_classnames_mapping_not_sort_order(tmp_path):
    for name, colour in (("tumor", (200, 40, 40)), ("normal", (40, 40, 200))):
        os.makedirs(tmp_path / name)
        for i in range(3):
            Image.new("RGB", (32, 32), colour).save(tmp_path / name / f"{i}.png")
    names = {"tumor": "tumor tissue", "normal": "normal tissue"}
    (tmp_path / "names.json").write_text(json.dumps(names))
    args = evaluate.parse_args(["--checkpoint", "x.pt", "--dataset", f"mine={tmp_path}",
                                "--classnames", f"mine={tmp_path / 'names.json'}"])
    tasks, datasets = evaluate.task_definitions(args)
    dataset = image_sets.load_dataset("mine", datasets["mine"], tasks["mine"])
    # "normal" sorts first, but the mapping puts "tumor" first
    for path, label in dataset.samples:
        folder = os.path.basename(os.path.dirname(path))
        assert list(tasks["mine"].values())[label] == names[folder]
    assert dataset.labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_pcam_hdf5_is_read_patch_by_patch_with_the_right_labels(tmp_path):
    labels = [0, 1, 1, 0, 1, 0, 0, 1, 1, 1]
    write_pcam(tmp_path, "test", labels)
    dataset = image_sets.PcamDataset(str(tmp_path), "test")
    assert dataset.labels.tolist() == labels and len(dataset) == 10
    for i in (0, 3, 9):
        image, label = dataset[i]
        assert label == labels[i] and image.size == (96, 96)
        assert np.asarray(image)[50, 50, 0] == i


def test_splits_are_seeded_stratified_and_recorded(tmp_path):
    pcam = str(tmp_path / "pcam")
    write_pcam(tmp_path / "pcam", "train", [0, 1] * 20)
    write_pcam(tmp_path / "pcam", "test", [0, 1] * 5)
    parts, record = evaluate.benchmark_splits("pcam", pcam, evaluate.TASKS["pcam"], seed=3)
    # no valid split: carved from train, 20% of each class
    assert record["refit"] and record["seed"] == 3
    assert record["per_class"] == {"train": [16, 16], "valid": [4, 4], "test": [5, 5]}
    assert not set(parts["train"][1].tolist()) & set(parts["valid"][1].tolist())
    again, _ = evaluate.benchmark_splits("pcam", pcam, evaluate.TASKS["pcam"], seed=3)
    other, _ = evaluate.benchmark_splits("pcam", pcam, evaluate.TASKS["pcam"], seed=4)
    assert torch.equal(parts["valid"][1], again["valid"][1])
    assert not torch.equal(parts["valid"][1], other["valid"][1])
    # the official valid split is used once it exists
    write_pcam(tmp_path / "pcam", "valid", [0, 1] * 3)
    parts, record = evaluate.benchmark_splits("pcam", pcam, evaluate.TASKS["pcam"])
    assert not record["refit"] and record["per_class"]["valid"] == [3, 3]
    assert record["per_class"]["train"] == [20, 20]
    assert "note" not in record

    # LC25000 has no split: half of each class is the test set
    write_lc25000(tmp_path / "lc", per_class=10)
    lung = evaluate.TASKS["lc25000_lung"]
    parts, record = evaluate.benchmark_splits("lc25000_lung", str(tmp_path / "lc"), lung)
    assert record["per_class"] == {"train": [4, 4, 4], "valid": [1, 1, 1], "test": [5, 5, 5]}
    indices = [set(idx.tolist()) for _, idx in parts.values()]
    assert sum(map(len, indices)) == len(set().union(*indices)) == 30
    # and its augmented siblings leak across a random split: the record says so
    assert "1,250 originals" in record["note"] and "probe" in record["note"]


def test_metrics_match_hand_computed_values():
    confusion = torch.tensor([[5, 1, 0], [2, 3, 1], [0, 0, 4]])  # rows: truth, columns: prediction
    labels = torch.cat([torch.full((int(confusion[t].sum()),), t) for t in range(3)])
    predictions = torch.cat([torch.full((int(confusion[t, p]),), p)
                             for t in range(3) for p in range(3)])
    metrics = evaluate.classification_metrics(labels, predictions, 3)
    assert metrics["confusion_matrix"] == confusion.tolist()
    assert metrics["accuracy"] == pytest.approx(12 / 16)
    assert metrics["per_class_recall"] == pytest.approx([5 / 6, 3 / 6, 4 / 4])
    assert metrics["balanced_accuracy"] == pytest.approx((5 / 6 + 3 / 6 + 1) / 3)
    f1 = [2 * 5 / (6 + 7), 2 * 3 / (6 + 4), 2 * 4 / (4 + 5)]  # F1 = 2 TP / (support + predicted)
    assert metrics["weighted_f1"] == pytest.approx((6 * f1[0] + 6 * f1[1] + 4 * f1[2]) / 16)


@pytest.mark.parametrize("case", ["missing folder", "lc25000 class missing", "pcam file missing",
                                  "pcam not hdf5", "unknown task"])
def test_a_broken_or_missing_dataset_path_gives_a_one_line_error(tmp_path, case):
    write_lc25000(tmp_path / "lc", per_class=1)
    os.makedirs(tmp_path / "pcam")
    colon = tmp_path / "lc" / "colon_image_sets"
    if case == "lc25000 class missing":
        os.rename(colon / "colon_n", colon / "normal")
    if case == "pcam not hdf5":
        for part in "xy":
            (tmp_path / "pcam" / f"camelyonpatch_level_2_split_test_{part}.h5").write_text("no")
    flag, path = {"missing folder": ("lc25000_colon", tmp_path / "nowhere"),
                  "lc25000 class missing": ("lc25000_colon", tmp_path / "lc"),
                  "pcam file missing": ("pcam", tmp_path / "pcam"),
                  "pcam not hdf5": ("pcam", tmp_path / "pcam"),
                  "unknown task": ("lc25000", tmp_path / "lc")}[case]
    # the datasets are checked before the (missing) checkpoint
    with pytest.raises(UsageError) as error:
        evaluate.main(["--checkpoint", str(tmp_path / "none.pt"), "--dataset", f"{flag}={path}"])
    message = str(error.value)
    assert "\n" not in message and str(path) in message, message


OUTPUTS = {  # an output path that cannot be written, and the cause its error names
    "figure in a missing folder": ("--figure", "missing/study.png", "does not exist"),
    "output in a missing folder": ("--output", "missing/results.json", "does not exist"),
    "output that is a folder": ("--output", "folder", "is a folder"),
    "figure inside a file": ("--figure", "file/study.png", "is a file, not a folder"),
}


@pytest.mark.parametrize("case", list(OUTPUTS))
@pytest.mark.parametrize("which", ["--checkpoint", "--runs"])
def test_an_output_that_cannot_be_written_is_refused_before_any_evaluation(
        case, which, tmp_path, monkeypatch):
    flag, where, cause = OUTPUTS[case]
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("mine")
    os.makedirs(tmp_path / "run" / "checkpoints")
    (tmp_path / "run" / "checkpoints" / "latest.pt").write_bytes(b"weights")
    (tmp_path / "run" / "manifest.json").write_text(json.dumps({"args": {"seed": 0}}))
    write_lc25000(tmp_path / "lc", per_class=1)

    def no_work(*args, **kwargs):
        raise AssertionError("the evaluation started")
    for name in ("dataset_fingerprints", "evaluate_checkpoint", "group_runs"):
        monkeypatch.setattr(evaluate, name, no_work)
    path = tmp_path / where
    target = str(tmp_path / "run" / "checkpoints" / "latest.pt")
    if which == "--runs":
        target = str(tmp_path / "run")
    started = time.monotonic()
    with pytest.raises(UsageError) as error:
        evaluate.main([which, target, "--dataset", f"lc25000_colon={tmp_path / 'lc'}",
                       flag, str(path)])
    seconds = time.monotonic() - started
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{flag} {path}: ") and cause in message
    assert seconds < 1, f"{seconds:.2f} s to refuse {flag} {path}"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into any folder")
def test_an_output_in_a_read_only_folder_is_refused_before_any_evaluation(tmp_path, monkeypatch):
    (tmp_path / "read_only").mkdir(mode=0o555)
    monkeypatch.setattr(evaluate, "dataset_fingerprints", None)  # called: a TypeError
    with pytest.raises(UsageError, match="no permission to write in"):
        evaluate.main(["--checkpoint", str(tmp_path / "none.pt"),
                       "--output", str(tmp_path / "read_only" / "results.json")])


@pytest.fixture(scope="module")
def demo_results(demo_run, tmp_path_factory):
    """evaluate.py on the demo run's final checkpoint and the demo's held-out sets."""
    output = tmp_path_factory.mktemp("eval") / "latest.eval.json"
    evaluate.main(["--checkpoint", str(demo_run / "checkpoints" / "latest.pt"),
                   "--output", str(output), "--workers", "0", "--device", "cpu"])
    return json.loads(output.read_text())


@pytest.mark.slow
def test_zero_shot_on_the_demo_checkpoint_beats_chance(demo_results):
    for task, scores in demo_results["datasets"].items():
        chance = 1 / len(evaluate.TASKS[task])
        assert scores["zero_shot"]["balanced_accuracy"] > chance + 0.1, (task, scores["zero_shot"])


@pytest.mark.slow
def test_linear_probe_beats_zero_shot_on_the_demo(demo_results):
    scores = demo_results["datasets"]
    probe = [scores[task]["linear_probe"]["balanced_accuracy"] for task in scores]
    zero = [scores[task]["zero_shot"]["balanced_accuracy"] for task in scores]
    # measured after 80 steps: 0.850 vs 0.843
    assert sum(probe) / len(probe) > sum(zero) / len(zero), (probe, zero)
    # Task by task, the probe is never worse than zero-shot beyond the noise of a 100-200 image
    # test set.
    assert all(p >= z - 0.03 for p, z in zip(probe, zero)), (probe, zero)
    for task in scores:
        assert scores[task]["linear_probe"]["weight_decay"] in evaluate.WEIGHT_DECAYS
    # LC25000 has no official split: the seeded, stratified one is written down with the results.
    split = scores["lc25000_colon"]["split"]
    assert split["seed"] == 0
    assert split["per_class"] == {"train": [40, 40], "valid": [10, 10], "test": [50, 50]}
    assert len(demo_results["checkpoint_sha256"]) == 64
    assert set(demo_results["fingerprints"]) == set(scores)


@pytest.mark.slow
def test_probe_rerun_reads_cached_features_and_is_identical(demo_run, demo_results, tmp_path,
                                                            monkeypatch):
    def no_encoding(*args, **kwargs):
        raise AssertionError("images were encoded again")
    monkeypatch.setattr(evaluate, "encode_images", no_encoding)
    output = tmp_path / "again.json"
    evaluate.main(["--checkpoint", str(demo_run / "checkpoints" / "latest.pt"),
                   "--output", str(output), "--workers", "0", "--device", "cpu"])
    assert json.loads(output.read_text())["datasets"] == demo_results["datasets"]


def test_multi_seed_table_groups_runs_by_manifest_and_uses_sample_std(tmp_path, monkeypatch,
                                                                       capsys):
    write_lc25000(tmp_path / "lc", per_class=2)
    datasets = ["--dataset", f"lc25000_colon={tmp_path / 'lc'}",
                "--dataset", f"lc25000_lung={tmp_path / 'lc'}"]
    # (args that differ, seed, zero-shot balanced accuracy on colon, on lung, torch version)
    runs = [({"rrc_scale": 0.6}, 0, 0.80, 0.6, "2.4.0"),
            ({"rrc_scale": 0.6}, 1, 0.82, 0.7, "2.4.0"),
            ({"rrc_scale": 0.6}, 2, 0.84, 0.8, "2.4.0"),
            ({"rrc_scale": 0.6}, 3, 0.5, 0.5, "2.3.0"),
            ({"rrc_scale": 0.8, "workers": 8}, 0, 0.9, 0.5, "2.4.0"),
            ({"rrc_scale": 0.8, "workers": 0}, 1, 0.9, 0.5, "2.4.0"),
            ({"rrc_scale": 0.8, "lr": 1e-4}, 0, 0.7, 0.7, "2.4.0")]
    folders = []
    scores = {}
    for i, (changes, seed, colon, lung, torch_version) in enumerate(runs):
        run = tmp_path / f"run{i}"
        os.makedirs(run / "checkpoints")
        # never loaded: evaluation is faked
        (run / "checkpoints" / "latest.pt").write_bytes(f"weights {i}".encode())
        args = {"model": "tiny", "lr": 5e-4, "rrc_scale": 0.8, "workers": 2, **changes,
                "seed": seed, "output_dir": str(run), "resume": None}
        manifest = {"args": args, "seed": seed, "train_data": {"sha256": "ab12"},
                    "versions": {"torch": torch_version, "numpy": "2.1.0"}}
        (run / "manifest.json").write_text(json.dumps(manifest))
        folders.append(str(run))
        checkpoint = os.path.abspath(run / "checkpoints" / "latest.pt")
        scores[checkpoint] = {"lc25000_colon": colon, "lc25000_lung": lung}

    def fake_evaluate_checkpoint(checkpoint, request, datasets, tasks, args):
        result = {**request, "datasets": {}}
        for task in datasets:
            value = scores[os.path.abspath(checkpoint)][task]
            result["datasets"][task] = {
                "zero_shot": {m: value for m in METRICS},
                "linear_probe": {m: value + 0.05 for m in METRICS}}
        return result
    monkeypatch.setattr(evaluate, "evaluate_checkpoint", fake_evaluate_checkpoint)
    output = tmp_path / "study" / "results.json"
    os.makedirs(output.parent)  # an --output in a folder that does not exist is refused
    evaluate.main(["--runs", *folders, *datasets, "--output", str(output),
                   "--figure", str(tmp_path / "study.png")])
    study = json.loads(output.read_text())
    table = capsys.readouterr().out

    # workers, output_dir and the seed do not split runs; another flag or library version does
    groups = {c["label"].replace(", torch_version=2.4.0", ""): c for c in study["configurations"]}
    assert {label: len(c["runs"]) for label, c in groups.items()} == {
        "lr=0.0005, rrc_scale=0.6": 3, "lr=0.0005, rrc_scale=0.6, torch_version=2.3.0": 1,
        "lr=0.0005, rrc_scale=0.8": 2, "lr=0.0001, rrc_scale=0.8": 1}
    summary = groups["lr=0.0005, rrc_scale=0.6"]["summary"]
    colon = summary["lc25000_colon"]["zero_shot"]["balanced_accuracy"]
    # ddof=1: sqrt(0.0008/2)
    assert colon["mean"] == pytest.approx(0.82) and colon["std"] == pytest.approx(0.02)
    assert (colon["min"], colon["max"], colon["n"]) == (0.80, 0.84, 3)
    lung = summary["lc25000_lung"]["linear_probe"]["accuracy"]
    assert lung["mean"] == pytest.approx(0.75) and lung["std"] == pytest.approx(0.1)
    one_run = groups["lr=0.0001, rrc_scale=0.8"]["summary"]["lc25000_colon"]["zero_shot"]
    assert one_run["accuracy"]["std"] is None
    assert groups["lr=0.0005, rrc_scale=0.6"]["most_reproducible"]["dataset"] == "lc25000_colon"
    assert "0.820 ± 0.020 (0.800–0.840)" in table and "most reproducible" in table
    assert {len(r["checkpoint_sha256"]) for r in study["runs"].values()} == {64}
    assert set(study["datasets"]) == {"lc25000_colon", "lc25000_lung"}
    assert study["datasets"]["lc25000_colon"]["fingerprints"]
    assert (tmp_path / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A second study reuses every run's stored results: nothing is evaluated again.
    monkeypatch.setattr(evaluate, "evaluate_checkpoint", None)
    evaluate.main(["--runs", *folders, *datasets, "--output", str(output)])
    assert json.loads(output.read_text())["configurations"] == study["configurations"]
