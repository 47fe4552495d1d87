"""The reproducibility promises of RULES.md, each checked with real training processes on the
CPU."""
import json
import os

import pytest
import torch

from conftest import STEPS, finish_small_run, relative_difference, start_small_run


def assert_identical(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


def final_sha(run_dir):
    return json.load(open(run_dir / "manifest.json"))["final_weights_sha256"]


@pytest.mark.slow
def test_same_seed_gives_bit_identical_weights_and_another_seed_does_not(small_csv, demo_csv,
                                                                         uninterrupted, tmp_path):
    # Run a saves and logs every step (STEPS), b once per epoch: that must change nothing either.
    a, first = uninterrupted
    flags = ["--batch-size", 8, "--max-steps", 8]
    started = [start_small_run(small_csv, demo_csv, tmp_path / name, *flags, "--seed", seed,
                               nproc=2)
               for name, seed in (("b", 0), ("c", 1))]
    runs = [first] + [finish_small_run(run) for run in started]
    assert_identical(runs[0]["model"], runs[1]["model"])
    shas = [final_sha(run) for run in (a, tmp_path / "b", tmp_path / "c")]
    assert shas[0] == shas[1] != shas[2]
    assert relative_difference(runs[0]["model"], runs[2]["model"]) > 0.1


@pytest.mark.slow
def test_data_loader_workers_do_not_change_the_weights(small_csv, demo_csv, tmp_path):
    started = [start_small_run(small_csv, demo_csv, tmp_path / f"w{workers}", "--max-steps", 8,
                               "--batch-size", 16, "--workers", workers)
               for workers in (0, 1, 2)]
    runs = [finish_small_run(run) for run in started]
    assert_identical(runs[0]["model"], runs[1]["model"])
    assert_identical(runs[0]["model"], runs[2]["model"])


@pytest.mark.slow
def test_any_power_of_two_split_of_the_global_batch_gives_the_same_bits(small_csv, demo_csv,
                                                                        tmp_path):
    # Global batch 16. Before the tree (RULE 3), 4 x 4, 2 x 4 x 2 and 1 x 4 x 4 differed in most
    # tensors (99-108 of 110 after 6 steps, up to 1.9e-6 relative). 2 x 8 = 1 x 8 x 2: see
    # tests/test_resume.py. One thread per process: the thread count is part of the bits.
    one_thread = {"OMP_NUM_THREADS": "1"}

    def final_states(precision, steps, splits):
        """Weights and Adam's moments (the gradients' bits show there first) after `steps`, for
        each (processes, --batch-size, --accum-steps): the runs of one precision at once."""
        started = [start_small_run(small_csv, demo_csv,
                                   tmp_path / f"{precision}-{processes}x{batch}x{accum}",
                                   "--max-steps", steps, "--lr", "1e-3", "--warmup", 2,
                                   "--precision", precision, "--batch-size", batch,
                                   "--accum-steps", accum, nproc=processes, env=one_thread)
                   for processes, batch, accum in splits]
        states = []
        for run in started:
            checkpoint = finish_small_run(run)
            state = dict(checkpoint["model"])
            for number, moments in checkpoint["optimizer"]["state"].items():
                state[f"exp_avg {number}"] = moments["exp_avg"]
                state[f"exp_avg_sq {number}"] = moments["exp_avg_sq"]
            states.append(state)
        return states

    four, two_by_two, one_by_four, two = final_states(
        "fp32", 3, [(4, 4, 1), (2, 4, 2), (1, 4, 4), (2, 8, 1)])
    assert_identical(four, two_by_two)
    assert_identical(four, one_by_four)
    # bf16 is emulated on most CPUs, and slow: 2 steps of it.
    bf16_four, bf16_two_by_two, bf16_one_by_four = final_states(
        "bf16", 2, [(4, 4, 1), (2, 4, 2), (1, 4, 4)])
    assert_identical(bf16_four, bf16_two_by_two)
    assert_identical(bf16_four, bf16_one_by_four)
    # Micro-batches of 8 rather than 4: other matmul shapes, so only float rounding.
    weights = [name for name in four if not name.startswith("exp_avg")]
    assert relative_difference(two, four, weights) < 1e-5
    manifest = json.load(open(tmp_path / "fp32-2x4x2" / "manifest.json"))
    assert manifest["world_size_guarantee"]["level"] == "bitwise"


def test_the_tree_sum_adds_subtree_sums_in_one_order():
    import train

    def tree_sum(terms):
        tree = train.TreeSum()
        for term in terms:
            tree.add(term.clone())
        return tree.total()

    torch.manual_seed(0)
    # Terms orders of magnitude apart, so that the order of the additions shows.
    terms = list(torch.randn(8, 1000) * torch.logspace(-3, 3, 8)[:, None])
    whole = tree_sum(terms)
    t = terms  # short, for the trees written out
    pairs = [t[0] + t[1], t[2] + t[3], t[4] + t[5], t[6] + t[7]]
    assert torch.equal(whole, (pairs[0] + pairs[1]) + (pairs[2] + pairs[3]))
    # 8 processes x 1 micro-batch, 4 x 2, 2 x 4: each rank's subtree, then the ranks' tree.
    for per_rank in (1, 2, 4):
        subtrees = [tree_sum(terms[i:i + per_rank]) for i in range(0, 8, per_rank)]
        assert torch.equal(tree_sum(subtrees), whole)
    assert not torch.equal(whole, sum(terms))  # a running sum: another order, other bits
    # Not a power of two: the unpaired subtrees are added right to left.
    assert torch.equal(tree_sum(terms[:3]), t[0] + t[1] + t[2])
    assert torch.equal(tree_sum(terms[:7]), (pairs[0] + pairs[1]) + (pairs[2] + t[6]))


@pytest.mark.parametrize("flags, world, level", [
    ([], 4, "bitwise"), (["--accum-steps", "2"], 8, "bitwise"), ([], 3, "float rounding"),
    (["--accum-steps", "3"], 2, "float rounding"), (["--local-loss"], 2, "float rounding"),
    (["--no-deterministic"], 1, "float rounding"), (["--no-gather-with-grad"], 2, "none"),
    (["--reduction", "ddp"], 4, "float rounding"), (["--reduction", "ddp"], 1, "float rounding")])
def test_the_world_size_guarantee_names_what_holds(flags, world, level):
    import train
    assert train.world_size_guarantee(train.parse_args(flags), world)["level"] == level


@pytest.mark.slow
def test_manifest_records_everything_that_decides_a_result(uninterrupted):
    manifest = json.load(open(uninterrupted[0] / "manifest.json"))
    # Defaults nobody typed.
    assert manifest["args"]["rrc_scale"] == 0.8 and manifest["args"]["lr"] == 5e-4
    assert manifest["world_size"] == 2 and manifest["global_batch_size"] == 16
    assert manifest["steps_per_epoch"] == 3
    assert manifest["determinism"]["deterministic"] is True
    assert manifest["world_size_guarantee"]["level"] == "bitwise"
    assert set(manifest["versions"]) >= {"python", "torch", "torchvision", "transformers",
                                         "tokenizers", "numpy", "pillow", "cuda", "cudnn", "nccl"}
    assert manifest["train_data"]["rows"] == 48 and len(manifest["train_data"]["sha256"]) == 64
    images = manifest["train_data"]["images"]  # all 48 files: a set this small is read whole
    assert (images["files"], images["rows"], len(images["sha256"])) == (48, 48, 64)
    assert "cpu_model" in manifest["device"]
    assert len(manifest["tokenizer"]["sha256"]) == 64 and manifest["git"]["commit"]
    assert len(manifest["final_weights_sha256"]) == 64
    assert manifest["command"] and manifest["started"]
    assert manifest["seed"] == 0 and manifest["finished"]


def test_deterministic_algorithms_are_on_by_default():
    import train
    args = train.parse_args([])
    train.seed_everything(args.seed, args.deterministic)
    try:
        assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.slow
def test_zero_shot_while_training_changes_no_bit_of_the_weights(small_csv, demo_csv,
                                                                uninterrupted, tmp_path):
    """--zeroshot-every 3 scores the demo's held-out sets after steps 3, 6 and the last (8), on
    rank 0 alone, into log.jsonl: the final weights are those of the same run without it."""
    whole, reference = uninterrupted
    scored = finish_small_run(start_small_run(small_csv, demo_csv, tmp_path / "zs", *STEPS,
                                              "--zeroshot-every", 3, nproc=2))
    assert_identical(reference["model"], scored["model"])
    assert final_sha(whole) == final_sha(tmp_path / "zs")
    lines = [json.loads(line) for line in open(tmp_path / "zs" / "log.jsonl")]
    zero_shot = [line for line in lines if "zero_shot" in line]
    assert [line["step"] for line in zero_shot] == [3, 6, 8]
    for line in zero_shot:
        assert set(line["zero_shot"]) == {"pcam", "lc25000_lung", "lc25000_colon"}
        assert all(0 <= accuracy <= 1 for accuracy in line["zero_shot"].values())
    assert [line["step"] for line in lines if "loss" in line] == list(range(1, 9))
