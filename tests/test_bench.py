"""bench.py: its analytic model FLOPs against PyTorch's FLOP counter, and a short run of the
benchmark.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_bench.py
"""
import contextlib
import math
import os
import platform
import re
import subprocess
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import bench
from support import demo_data
import train
from model import CLIP, CLIPConfig, model_config
from support.errors import UsageError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OTHER_SIZE = CLIPConfig(embed_dim=48, image_size=48, patch_size=12, vision_width=96,
                        vision_layers=2, vision_head_width=32, context_length=20, vocab_size=300,
                        text_width=64, text_heads=2, text_layers=3)


@pytest.mark.parametrize("cfg, batch_size", [(model_config("tiny"), 6), (OTHER_SIZE, 5)],
                         ids=["tiny", "other"])
def test_model_flops_match_flop_counter_mode_on_a_training_step(cfg, batch_size):
    torch.manual_seed(0)
    model = CLIP(cfg).train()
    images = torch.randn(batch_size, 3, cfg.image_size, cfg.image_size)
    tokens = torch.randint(1, cfg.vocab_size - 1, (batch_size, cfg.context_length))
    tokens[:, -1] = cfg.vocab_size - 1
    counter = FlopCounterMode(display=False)
    # The CPU's fused attention kernel has no FLOP formula (it would count 0); the math kernel
    # runs the same attention as matmuls, over the full L x L scores, causal or not.
    args = train.parse_args([])
    with sdpa_kernel(SDPBackend.MATH), counter:
        train.train_step(model, [(images, tokens)], args, contextlib.nullcontext())
    counted = counter.get_total_flops()
    analytic = bench.model_flops(cfg, batch_size)
    # They agree exactly today. 1e-6 rather than 1%: the smallest term, the logits, is ~1e-5 of
    # the total here, and a looser tolerance would let it (or the projections, ~1e-3) go missing
    # unnoticed.
    assert abs(analytic - counted) <= 1e-6 * counted, \
        f"analytic {analytic} vs FlopCounterMode {counted}"


BENCH_FLAGS = ["--steps", 2, "--warmup", 1, "--batch-size", 8, "--workers", 1, "--threads", 1,
               "--peak-size", 256, "--width", 64, "--layers", 1, "--text-width", 64,
               "--text-layers", 1, "--embed-dim", 32]
# measure()'s line: "NAME: step T ms (median of N; min A, max B), S samples/s, G GFLOP/s of model
# FLOPs = M% MFU of the start peak[, P% of the peak after each step], peak memory R MiB (KIND)"
NUMBER = r"(\d+(?:\.\d+)?)"
MEASURED = re.compile(
    rf"^(synthetic|real pipeline): step {NUMBER} ms \(median of 2; min {NUMBER}, max {NUMBER}\), "
    rf"{NUMBER} samples/s, {NUMBER} GFLOP/s of model FLOPs = {NUMBER}% MFU of the start peak"
    rf"(?:, {NUMBER}% of the peak after each step)?, peak memory {NUMBER} MiB \(.+\)$")


def the_line(lines, pattern):
    """The match of `pattern` in the one line of `lines` it matches."""
    found = [m for m in map(re.compile(pattern).search, lines) if m]
    assert len(found) == 1, (pattern, lines)
    return found[0]


def within(printed, low, high):
    """`printed`, rounded to 0.1, could be a value in [low, high]."""
    return low - 0.05 <= printed <= high + 0.05


def assert_measured(line, batch_size, flops, peak_gflops):
    """One part's figures: positive and finite, and each derived from the step time as bench.py
    says (samples/s = batch / step, model FLOP/s = FLOPs / step, MFU = FLOP/s / peak), up to the
    rounding of the printed figures. Returns the MFU beside each step, None where not printed."""
    found = MEASURED.match(line)
    assert found, line
    step_ms, low_ms, high_ms, samples_per_s, gflops, mfu = map(float, found.groups()[1:7])
    assert 0 < low_ms <= step_ms <= high_ms < math.inf, line
    # The step time is printed to 0.1 ms, the peak to 0.1 GFLOP/s.
    fastest = (step_ms - 0.05) / 1e3
    slowest = (step_ms + 0.05) / 1e3
    assert within(samples_per_s, batch_size / slowest, batch_size / fastest), line
    assert within(gflops, flops / 1e9 / slowest, flops / 1e9 / fastest), line
    lowest_mfu = 100 * (gflops - 0.05) / (peak_gflops + 0.05)
    highest_mfu = 100 * (gflops + 0.05) / (peak_gflops - 0.05)
    assert within(mfu, lowest_mfu, highest_mfu), line
    assert 0 < mfu <= 100, line
    memory = float(found[9])
    assert memory > 0, line
    if found[8] is None:
        return None
    mfu_now = float(found[8])
    assert 0 < mfu_now <= 100, line
    return mfu_now


@pytest.mark.slow
def test_bench_runs_both_parts_and_prints_throughput_and_mfu(demo_csv):
    command = [sys.executable, os.path.join(REPO, "bench.py"), *map(str, BENCH_FLAGS)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    # The FLOPs it divides by are bench.model_flops's for the model it built.
    args = bench.parse_args(list(map(str, BENCH_FLAGS)))
    flops = bench.model_flops(bench.bench_config(args), 8)
    printed = the_line(lines, r"^model FLOPs: (\S+) GFLOP per step of 8 \((\S+) per sample")
    assert printed.groups() == (f"{flops / 1e9:.2f}", f"{flops / 8 / 1e9:.3f}")
    peak = float(the_line(lines, rf"^peak: {NUMBER} GFLOP/s")[1])
    assert 0 < peak < math.inf
    synthetic = the_line(lines, r"^synthetic: .*").string
    pipeline = the_line(lines, r"^real pipeline: step .*").string
    # Only synthetic steps are compared with a peak matmul beside each: the pipeline's steps run
    # back to back.
    mfu_now = assert_measured(synthetic, 8, flops, peak)
    assert mfu_now is not None
    assert assert_measured(pipeline, 8, flops, peak) is None
    images_per_s = float(the_line(lines, rf"^data pipeline alone: {NUMBER} images/s")[1])
    assert 0 < images_per_s < math.inf
    assert the_line(lines, r"^peak again at the end: .*% of the synthetic figure$")
    # The table's row repeats them.
    assert lines[-2].startswith("| device |")
    row = [cell.strip() for cell in lines[-1].strip("|").split("|")]
    synthetic_rate = MEASURED.match(synthetic)[5]
    pipeline_rate = MEASURED.match(pipeline)[5]
    assert row[1:] == ["fp32", "8", synthetic_rate, pipeline_rate, f"{mfu_now:.1f}%"], row



@pytest.mark.slow
def test_ddp_mode_times_the_tree_hook_against_ddps_all_reduce(capsys):
    """bench.py --ddp 2: both reductions really run, and the cost is printed from their times;
    the tree holds log2 K copies of the gradients under --accum-steps K."""
    bench.main(["--ddp", "2", "--steps", "2", "--warmup", "1", "--batch-size", "4",
                "--accum-steps", "4"])
    line, copies = capsys.readouterr().out.strip().splitlines()[-2:]
    assert "2.00 x the" in copies, copies
    found = re.search(rf"step {NUMBER} ms with DDP's all-reduce, {NUMBER} ms with the tree hook "
                      rf"\(([+-]\d+\.\d)%; medians of 4\)", line)
    assert found, line
    plain, tree, cost = (float(found[i]) for i in (1, 2, 3))
    assert 0 < plain < math.inf and 0 < tree < math.inf
    assert abs(100 * (tree / plain - 1) - cost) < 0.2, line  # the ms are printed rounded

KEEP_FREED_MEMORY_PROBE = """
import resource, sys, torch
from support import machine
kept = machine.keep_freed_memory(torch.device("cpu")) if sys.argv[1] == "keep" else None
faults = []
for step in range(30):  # a "step" allocates a 64 MiB activation, writes it and frees it
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(2**24).fill_(1)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, sum(faults[-5:]))  # once settled: glibc's heap took 4-8 steps to settle here
"""


@pytest.mark.slow
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or os.environ.get("LD_PRELOAD"),
                    reason="glibc's own malloc (not one preloaded in its place, such as jemalloc "
                    "or tcmalloc)")
@pytest.mark.parametrize("flags", [["--ddp", "2", "--no-deterministic"], ["--ddp", "3"]])
def test_ddp_mode_is_refused_where_train_py_would_not_use_the_tree(flags):
    """Where RULE 3 promises no bits, train.py uses DDP's all-reduce on both sides: timing 'the
    tree hook' there would compare DDP with itself."""
    with pytest.raises(UsageError, match="--ddp N times the tree hook"):
        bench.parse_args(flags)


def test_keep_freed_memory_lets_each_step_reuse_the_pages_of_the_step_before():
    probe = {}
    for mode in ("default", "keep"):
        command = [sys.executable, "-c", KEEP_FREED_MEMORY_PROBE, mode]
        result = subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True,
                                timeout=120)
        probe[mode] = result.stdout.split()
    assert probe["keep"][0] == "True", probe  # mallopt accepted both settings
    faults = {mode: int(out[1]) for mode, out in probe.items()}
    # By default each step maps the block afresh, and the kernel faults it in again: measured
    # 16384 faults a step, one per 4 KiB page (fewer where huge pages are on). Kept, the pages are
    # already in the process: measured 0.
    assert faults["keep"] * 20 < faults["default"], faults


def test_jpeg_draft_decodes_large_jpegs_smaller_but_never_below_the_smallest_crop(tmp_path):
    import data
    import numpy as np
    from PIL import Image
    tile = demo_data.render_tile(np.random.default_rng(0), "colon_aca")
    Image.fromarray(tile).resize((1600, 1200)).save(tmp_path / "big.jpg", quality=90)
    Image.fromarray(tile).resize((1600, 1200)).save(tmp_path / "big.png")
    draft_size = data.CsvDataset([], "", None, 224, 77, 0.8, 0).draft_size  # default: no draft
    assert draft_size is None
    draft_size = data.CsvDataset([], "", None, 224, 77, 0.8, 0, jpeg_draft=True).draft_size
    full = data.load_rgb(tmp_path / "big.jpg")
    draft = data.load_rgb(tmp_path / "big.jpg", draft_size=draft_size)
    # 1/4 scale: 1/8 would go below 290
    assert full.size == (1600, 1200) and draft.size == (400, 300)
    assert min(draft.size) >= draft_size == 290  # 224 / sqrt(0.8 * 3/4) = 289.2, rounded up
    # The smallest RandomResizedCrop of the drafted image still has >= 224 pixels on each side.
    assert (0.8 * 400 * 300 * 3 / 4) ** 0.5 >= 224
    # Same pixels every time (a reproducible decode), close to the full decode's; PNGs are never
    # drafted.
    again = data.load_rgb(tmp_path / "big.jpg", draft_size=draft_size)
    assert np.array_equal(np.asarray(draft), np.asarray(again))
    reference = np.asarray(full.resize(draft.size, Image.BOX), dtype=np.float32)
    assert np.abs(np.asarray(draft, dtype=np.float32) - reference).mean() < 3
    assert data.load_rgb(tmp_path / "big.png", draft_size=draft_size).size == (1600, 1200)


def test_input_pipeline_prints_images_per_core_and_cores_per_gpu_for_each_frame_size(capsys):
    threads = torch.get_num_threads()
    try:  # in this process, to spare the imports; the mode takes one thread, given back after
        bench.main(["--input-pipeline", "--frames", "2", "--gpu-samples-per-s", "1000"])
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.splitlines()
    rows = [line.strip("|").split("|") for line in lines if re.match(r"^\| \d+x\d+ \|", line)]
    cells = {(row[0].strip(), row[2].strip()): row for row in rows}
    sizes = ["1920x1080", "1280x720", "455x256"]
    assert sorted(cells) == sorted((size, decode) for size in sizes
                                   for decode in ("full", "--jpeg-draft")), lines
    for row in rows:
        kib, ms, per_core, cores = (float(row[i]) for i in (1, 3, 4, 5))
        assert all(0 < value < math.inf for value in (kib, ms, per_core, cores)), row
        # Each figure is derived from the one before it, up to the printed rounding.
        assert within(per_core, 1e3 / (ms + 0.05), 1e3 / (ms - 0.05)), row
        assert within(cores, 1000 / (per_core + 0.05), 1000 / (per_core - 0.05)), row
    assert the_line(lines, r"^1000 samples/s is given \(--gpu-samples-per-s\), not measured")
    for size in sizes[:2]:
        found = the_line(lines, rf"^pre-resized 455x256 over {size}: {NUMBER}x .* {NUMBER}x")
        assert all(0 < float(value) < math.inf for value in found.groups()), found.string
    # The worker boundary is arithmetic: 256 x 3 x 224 x 224 bytes, x 4 as float32.
    assert the_line(lines, r"float32 is 147.0 MiB; 8 workers x prefetch 4 hold 4.59 GiB$")
    assert the_line(lines, r"uint8 is 36.8 MiB; 8 workers x prefetch 4 hold 1.15 GiB$")
