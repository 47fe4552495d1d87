"""Published weights: a Hugging Face CLIPModel folder, OpenAI / OpenCLIP state dicts and OpenAI's
TorchScript archives load into our CLIP with the same outputs, export back to Hugging Face exactly,
fine-tune under torchrun, and a checkpoint that does not fit fails with one clear line.

Everything is built here, tiny and random: nothing is downloaded.
    OMP_NUM_THREADS=1 python -m pytest -q tests/test_pretrained.py
"""
import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import transformers
from tokenizers import pre_tokenizers

import data
import model
from conftest import REPO, relative_difference, run_train
from conftest import export_hf
from model import CLIP
from support.pretrained import OPENAI_JIT_SHA256
from support.errors import UsageError

CONTEXT_LENGTH = 24
CAPTIONS = ["the thin man", "An H&E stained section of colon adenocarcinoma.", "tumour"]
MERGES = [("t", "h"), ("th", "e</w>"), ("i", "n"), ("a", "n"), ("o", "n</w>"), ("c", "o")]
VOCAB_SIZE = 2 * 256 + len(MERGES) + 2  # bytes, bytes ending a word, merges, start- and end-of-text


def write_clip_tokenizer(folder):
    """vocab.json + merges.txt laid out as OpenAI's CLIP vocabulary is: the byte alphabet, the
    same with the end-of-word mark "</w>", the merges, then start- and end-of-text, which is
    therefore the last id."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    word_ends = [c + "</w>" for c in alphabet]
    merged = [a + b for a, b in MERGES]
    vocab = alphabet + word_ends + merged + [data.SOT, data.EOT]
    os.makedirs(folder)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({token: i for i, token in enumerate(vocab)}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES))
    return folder


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return write_clip_tokenizer(str(tmp_path_factory.mktemp("clip_tokenizer") / "tokenizer"))


def save_tiny_hf_clip(folder, vocab_size, width, heads, hidden_act):
    """A random transformers.CLIPModel, every parameter perturbed (LayerNorms and biases
    included)."""
    tower = dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=2,
                 num_attention_heads=heads, hidden_act=hidden_act)
    vision = dict(**tower, image_size=32, patch_size=8)
    text = dict(**tower, vocab_size=vocab_size, max_position_embeddings=CONTEXT_LENGTH,
                bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                pad_token_id=vocab_size - 1)
    config = transformers.CLIPConfig(projection_dim=24, vision_config=vision, text_config=text)
    torch.manual_seed(0)
    hf_model = transformers.CLIPModel(config).eval()
    with torch.no_grad():
        for parameter in hf_model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    hf_model.save_pretrained(folder)
    return hf_model


# QuickGELU with OpenAI's 64-wide heads (what OpenAI-named files imply), and GELU with 16-wide
# heads, which only the config next to the weights can tell.
TOWERS = {"quick_gelu-64wide_heads": (128, 2, "quick_gelu"), "gelu-16wide_heads": (64, 4, "gelu")}


@pytest.fixture(scope="module", params=list(TOWERS))
def hf_clip(request, tmp_path_factory):
    """(folder, the transformers model saved there) for each tower shape above."""
    folder = str(tmp_path_factory.mktemp(f"hf_{request.param}"))
    return folder, save_tiny_hf_clip(folder, VOCAB_SIZE, *TOWERS[request.param])


@pytest.fixture(scope="module")
def hf_openai_sized(tmp_path_factory):
    """The same for sizes that OpenAI-named files imply without a config: QuickGELU, 64-wide
    heads."""
    folder = str(tmp_path_factory.mktemp("hf_openai_sized"))
    return folder, save_tiny_hf_clip(folder, VOCAB_SIZE, *TOWERS["quick_gelu-64wide_heads"])


@pytest.fixture(scope="module")
def inputs(tokenizer_dir):
    """Images, our tokens (padded with 0) and CLIP's Hugging Face tokens (padded with
    end-of-text)."""
    tokenizer = data.load_tokenizer(tokenizer_dir)
    hf_tokens = tokenizer(CAPTIONS, padding="max_length", max_length=CONTEXT_LENGTH,
                          truncation=True, return_tensors="pt")["input_ids"]
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(len(CAPTIONS), 3, 32, 32, generator=generator)
    our_tokens = data.tokenize(tokenizer, CAPTIONS, CONTEXT_LENGTH)
    return images, our_tokens, hf_tokens


def assert_same_outputs(ours, hf_model, inputs):
    images, our_tokens, hf_tokens = inputs
    with torch.no_grad():
        hf_out = hf_model(input_ids=hf_tokens, pixel_values=images)
        hf_image = hf_model.get_image_features(pixel_values=images).pooler_output
        hf_text = hf_model.get_text_features(input_ids=hf_tokens).pooler_output
        image_features, text_features, logit_scale = ours(images, our_tokens)
        close = dict(atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.encode_image(images), hf_image, **close)
        torch.testing.assert_close(ours.encode_text(our_tokens), hf_text, **close)
        logits = logit_scale * image_features @ text_features.T
        torch.testing.assert_close(logits, hf_out.logits_per_image, **close)


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def save_as_run_checkpoint(ours, tokenizer_dir, run_dir):
    """Our model in a run folder's layout, as train.py leaves it: RUN/checkpoints/*.pt and
    RUN/tokenizer."""
    os.makedirs(os.path.join(run_dir, "checkpoints"))
    shutil.copytree(tokenizer_dir, os.path.join(run_dir, "tokenizer"))
    path = os.path.join(run_dir, "checkpoints", "step_0.pt")
    torch.save({"model": ours.state_dict(), "config": asdict(ours.config), "step": 0}, path)
    return path


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def one_line_exit(call, *needles):
    with pytest.raises(UsageError) as exit_info:
        call()
    message = str(exit_info.value)
    assert "\n" not in message and all(needle in message for needle in needles), message
    return message


# ----------------------------------------------------------------------------- equal outputs

def test_hf_clipmodel_folder_gives_hf_embeddings_and_logits(hf_clip, inputs):
    folder, hf_model = hf_clip
    ours = CLIP.from_pretrained(folder)
    vision, text = hf_model.config.vision_config, hf_model.config.text_config
    assert ours.config.quick_gelu == (text.hidden_act == "quick_gelu")
    assert ours.config.vision_width // ours.config.vision_head_width == vision.num_attention_heads
    assert ours.config.text_heads == text.num_attention_heads
    assert ours.config.context_length == CONTEXT_LENGTH and ours.config.image_size == 32
    # Ours pads with 0 and HF with end-of-text: both pool at the first end-of-text, so they agree.
    assert_same_outputs(ours, hf_model, inputs)


def test_hf_folder_with_pytorch_model_bin_loads_the_same(hf_clip, tmp_path):
    folder, hf_model = hf_clip
    os.symlink(os.path.join(folder, "config.json"), tmp_path / "config.json")
    # Older transformers versions saved the position_ids buffers too; they are not weights.
    position_ids = torch.arange(CONTEXT_LENGTH)[None]
    old_style = {**hf_model.state_dict(), "text_model.embeddings.position_ids": position_ids}
    torch.save(old_style, tmp_path / "pytorch_model.bin")
    from_bin = CLIP.from_pretrained(str(tmp_path)).state_dict()
    assert_same_weights(from_bin, CLIP.from_pretrained(folder).state_dict())


def export_run_checkpoint(hf_folder, tokenizer_dir, tmp_path, export):
    """HF folder -> ours, saved as a run checkpoint -> `export`ed to a HF folder; returns (ours,
    the exported transformers.CLIPModel, the exported folder)."""
    ours = CLIP.from_pretrained(hf_folder)
    checkpoint = save_as_run_checkpoint(ours, tokenizer_dir, str(tmp_path / "run"))
    out_dir = str(tmp_path / "hf_export")
    export(checkpoint, out_dir)
    return ours, transformers.CLIPModel.from_pretrained(out_dir).eval(), out_dir


def test_export_hf_round_trip_is_exact(hf_clip, inputs, tokenizer_dir, tmp_path):
    folder, hf_model = hf_clip
    ours, exported, out_dir = export_run_checkpoint(folder, tokenizer_dir, tmp_path,
                                                    export_hf)
    # HF -> ours -> HF changes no bit
    assert_same_weights(exported.state_dict(), hf_model.state_dict())
    assert_same_outputs(ours, exported, inputs)
    # The run's tokenizer travels with the export, so the folder is complete for transformers
    # users.
    tokenizer = transformers.AutoTokenizer.from_pretrained(out_dir)
    eos_token_id = exported.config.text_config.eos_token_id
    assert tokenizer.eos_token_id == eos_token_id == len(tokenizer) - 1


def export_with_the_command(checkpoint, out_dir):
    """`python model.py --export-hf CHECKPOINT OUT_DIR`, as README shows it."""
    command = [sys.executable, "model.py", "--export-hf", checkpoint, out_dir]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_export_hf_command_line_round_trip_is_exact(hf_openai_sized, tokenizer_dir, tmp_path):
    folder, hf_model = hf_openai_sized
    _, exported, out_dir = export_run_checkpoint(folder, tokenizer_dir, tmp_path,
                                                 export_with_the_command)
    assert_same_weights(exported.state_dict(), hf_model.state_dict())
    tokenizer = transformers.AutoTokenizer.from_pretrained(out_dir)
    assert tokenizer.eos_token_id == len(tokenizer) - 1


def openai_state_dict(sd):
    """OpenAI's files carry the input resolution, context length and vocabulary size too."""
    sizes = {"input_resolution": torch.tensor(32),
             "context_length": torch.tensor(CONTEXT_LENGTH),
             "vocab_size": torch.tensor(VOCAB_SIZE)}
    return {**sd, **sizes}


def open_clip_training_checkpoint(sd):
    """OpenCLIP's training checkpoints: DDP's "module." names under "state_dict"."""
    return {"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in sd.items()}}


def compiled_ddp_with_1d_logit_scale(sd):
    """torch.compile inside DDP prefixes "module._orig_mod."; older OpenCLIP saved logit_scale
    with shape (1,)."""
    renamed = {}
    for key, value in sd.items():
        if key == "logit_scale":
            value = value.reshape(1)
        renamed[f"module._orig_mod.{key}"] = value
    return renamed


OPENAI_STYLE = {  # how OpenAI and OpenCLIP files hold the same weights
    "openai_state_dict": openai_state_dict,
    "open_clip_pytorch_model_bin": dict,
    "open_clip_training_checkpoint": open_clip_training_checkpoint,
    "compiled_ddp_with_1d_logit_scale": compiled_ddp_with_1d_logit_scale,
}


@pytest.mark.parametrize("style", list(OPENAI_STYLE))
def test_openai_named_state_dicts_round_trip(style, hf_openai_sized, inputs, tmp_path):
    folder, hf_model = hf_openai_sized
    via_hf = CLIP.from_pretrained(folder)
    torch.save(OPENAI_STYLE[style](via_hf.state_dict()), tmp_path / "weights.pt")
    ours = CLIP.from_pretrained(str(tmp_path / "weights.pt"))
    # Sizes from shapes, QuickGELU and 64-wide heads as for OpenAI's.
    assert ours.config == via_hf.config
    assert_same_weights(ours.state_dict(), via_hf.state_dict())
    assert_same_outputs(ours, hf_model, inputs)
    # ... and on to Hugging Face again.
    out_dir = str(tmp_path / "hf_again")
    export_hf(str(tmp_path / "weights.pt"), out_dir)
    exported = transformers.CLIPModel.from_pretrained(out_dir)
    assert_same_weights(exported.state_dict(), hf_model.state_dict())


def test_a_vision_mlp_of_another_width_is_read_from_the_shapes(tmp_path):
    # OpenCLIP's mlp_ratio in a bare state dict, beside no config. 448 x (453 / 448) is 452.99...
    sizes = {"vision_width": 448, "vision_head_width": 64, "vision_mlp_ratio": 1.0112,
             "text_heads": 2}
    torch.manual_seed(0)
    original = CLIP(replace(model.model_config("tiny"), **sizes)).eval()
    torch.save(original.state_dict(), tmp_path / "weights.pt")
    loaded = CLIP.from_pretrained(str(tmp_path / "weights.pt"), activation="gelu")
    assert loaded.visual.transformer.resblocks[0].mlp.c_fc.out_features == 453
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), original.encode_image(images))


def test_open_clip_config_next_to_the_weights_decides_heads_and_activation(hf_clip, tmp_path):
    ours = CLIP.from_pretrained(hf_clip[0])
    torch.save(ours.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    weights = str(tmp_path / "open_clip_pytorch_model.bin")
    assert CLIP.from_pretrained(weights).config.quick_gelu  # OpenAI's
    model_cfg = {"quick_gelu": False,
                 "vision_cfg": {"head_width": ours.config.vision_head_width},
                 "text_cfg": {"heads": ours.config.text_heads}}
    with open(tmp_path / "open_clip_config.json", "w") as f:  # as OpenCLIP pushes it to the Hub
        json.dump({"model_cfg": model_cfg}, f)
    loaded = CLIP.from_pretrained(weights)
    assert asdict(loaded.config) == {**asdict(ours.config), "quick_gelu": False}


def test_openai_torchscript_archive_loads_only_when_published(hf_openai_sized, tmp_path,
                                                              monkeypatch):
    ours = CLIP.from_pretrained(hf_openai_sized[0])
    for name, value in openai_state_dict({}).items():
        ours.register_buffer(name, value)  # OpenAI's archives carry these three
    path = str(tmp_path / "ViT-tiny.pt")
    torch.jit.trace_module(ours, {"encode_image": torch.randn(1, 3, 32, 32)}).save(path)
    # An archive is a program: one that OpenAI did not publish is refused, not run.
    one_line_exit(lambda: CLIP.from_pretrained(path), path, "TorchScript", "torch.jit.load")
    with open(path, "rb") as f:
        monkeypatch.setitem(OPENAI_JIT_SHA256, hashlib.sha256(f.read()).hexdigest(), "ViT-tiny.pt")
    loaded = CLIP.from_pretrained(path)
    assert loaded.config.quick_gelu
    assert_same_weights(loaded.state_dict(), CLIP.from_pretrained(hf_openai_sized[0]).state_dict())


# ----------------------------------------------------------------------------- clear refusals

def test_checkpoint_that_does_not_fit_is_refused_naming_the_key(hf_openai_sized, tmp_path):
    state_dict = CLIP.from_pretrained(hf_openai_sized[0]).state_dict()
    path = str(tmp_path / "weights.pt")
    key = "transformer.resblocks.1.mlp.c_fc.weight"
    torch.save({**state_dict, key: state_dict[key][:-1]}, path)
    one_line_exit(lambda: CLIP.from_pretrained(path), path, key, "(511, 128)", "needs (512, 128)")
    torch.save({k: v for k, v in state_dict.items() if k != "visual.ln_post.bias"}, path)
    one_line_exit(lambda: CLIP.from_pretrained(path), path, "visual.ln_post.bias is nothing")
    torch.save({**state_dict, "visual.attn_pool.query": torch.zeros(3)}, path)
    one_line_exit(lambda: CLIP.from_pretrained(path), path, "visual.attn_pool.query is (3,)",
                  "needs nothing")
    hf_weights = hf_openai_sized[1].state_dict()
    os.symlink(os.path.join(hf_openai_sized[0], "config.json"), tmp_path / "config.json")
    hf_key = "text_model.encoder.layers.0.self_attn.k_proj.weight"
    torch.save({**hf_weights, hf_key: hf_weights[hf_key][:, :-1]}, tmp_path / "pytorch_model.bin")
    one_line_exit(lambda: CLIP.from_pretrained(str(tmp_path)), hf_key)


def test_unreadable_or_foreign_files_fail_with_one_clear_line(hf_openai_sized, tmp_path):
    folder, _ = hf_openai_sized
    good = str(tmp_path / "good.pt")
    torch.save(CLIP.from_pretrained(folder).state_dict(), good)
    cases = {
        "truncated.pt": read_bytes(good)[:5000],
        "truncated.safetensors": read_bytes(os.path.join(folder, "model.safetensors"))[:5000],
        "notes.bin": b"these are not weights\n",
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        one_line_exit(lambda: CLIP.from_pretrained(str(tmp_path / name)), name,
                      "not a readable weights file")
    # A pickle that would build arbitrary Python objects is refused, never executed.
    torch.save({"model": argparse.Namespace(x=1)}, tmp_path / "pickled_object.pt")
    one_line_exit(lambda: CLIP.from_pretrained(str(tmp_path / "pickled_object.pt")),
                  "not a readable weights file")
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "resnet.pt")
    one_line_exit(lambda: CLIP.from_pretrained(str(tmp_path / "resnet.pt")), "visual.conv1.weight")
    os.makedirs(tmp_path / "empty")
    one_line_exit(lambda: CLIP.from_pretrained(str(tmp_path / "empty")), "model.safetensors")
    one_line_exit(lambda: CLIP.from_pretrained(str(tmp_path / "missing.pt")), "No such file")


# ------------------------------------------------------------------------- tokenizer, fine-tuning

def test_clip_tokenizer_folder_pads_and_ends_like_clip(tokenizer_dir):
    tokenizer = data.load_tokenizer(tokenizer_dir)  # OpenAI's two files, no tokenizer_config.json
    assert isinstance(tokenizer, transformers.CLIPTokenizer)
    assert tokenizer.eos_token_id == len(tokenizer) - 1
    ours = data.tokenize(tokenizer, CAPTIONS, CONTEXT_LENGTH)
    clip = tokenizer(CAPTIONS, padding="max_length", max_length=CONTEXT_LENGTH,
                     truncation=True)["input_ids"]
    for row, expected in zip(ours.tolist(), clip):
        end = expected.index(tokenizer.eos_token_id) + 1
        assert row[:end] == expected[:end]  # the same, then padding with 0
        assert set(row[end:]) <= {0}
        assert row[0] == tokenizer.bos_token_id
        assert row.index(max(row)) == end - 1  # argmax is the first EOT


def assert_one_adamw_step_from(start, tuned, lr, wd):
    """`tuned` is `start` after one AdamW step: each weight moved by at most lr, plus its decay.

    Adam's first step is lr * g / (|g| + eps), whatever the gradient's scale: at most lr. Weight
    decay then takes lr * wd * |w| at most. A run that began anywhere else is further away.
    """
    moved = 0.0
    for key, before in start.items():
        change = (tuned[key] - before).abs()
        bound = lr * (1 + wd * before.abs()) + 1e-6  # 1e-6: rounding in float32
        assert (change <= bound).all(), f"{key} moved {change.max():.3g}, more than one step"
        moved = max(moved, change.max().item())
    assert moved > lr / 2, "the step moved no weight"


@pytest.mark.slow
def test_notes_on_published_weights_are_printed_once_on_several_ranks(
        demo_csv, hf_openai_sized, tokenizer_dir, tmp_path):
    # OpenAI's layout, and no config beside it: the activation is assumed, and said so.
    weights = str(tmp_path / "openai.pt")
    torch.save(CLIP.from_pretrained(hf_openai_sized[0]).state_dict(), weights)
    result = run_train("--pretrained", weights, "--tokenizer", tokenizer_dir, "--max-steps", 1,
                       "--batch-size", 4, "--workers", 0, "--output-dir", tmp_path / "run",
                       nproc=2)
    notes = [line for line in result.stdout.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "assuming QuickGELU" in notes[0], result.stdout[-2000:]


@pytest.mark.slow
def test_one_step_finetune_from_hf_weights_under_torchrun(demo_csv, hf_openai_sized, tokenizer_dir,
                                                          tmp_path):
    hf_dir = hf_openai_sized[0]
    start = CLIP.from_pretrained(hf_dir)
    run = str(tmp_path / "run")
    run_train("--pretrained", hf_dir, "--tokenizer", tokenizer_dir, "--max-steps", 1,
              "--batch-size", 4, "--workers", 0, "--output-dir", run, nproc=2, launcher="command")
    tuned = CLIP.from_pretrained(os.path.join(run, "checkpoints", "latest.pt"))
    assert tuned.config == start.config
    # Training began at the published weights, not at a model of the same sizes: one step away
    # from them, and far from the fresh model the same seed would have built instead.
    args = json.load(open(os.path.join(run, "manifest.json")))["args"]
    assert_one_adamw_step_from(start.state_dict(), tuned.state_dict(), args["lr"], args["wd"])
    torch.manual_seed(args["seed"])
    fresh = CLIP(start.config)
    assert relative_difference(tuned.state_dict(), fresh.state_dict()) > 0.1
    # Our own checkpoint brings its run's tokenizer (kept in RUN/tokenizer); published weights
    # need --tokenizer.
    again = str(tmp_path / "again")
    run_train("--pretrained", os.path.join(run, "checkpoints", "latest.pt"), "--max-steps", 1,
              "--batch-size", 4, "--workers", 0, "--output-dir", again)
    manifests = [json.load(open(os.path.join(d, "manifest.json"))) for d in (run, again)]
    assert manifests[1]["tokenizer"]["path"] == os.path.join(run, "tokenizer")
    assert manifests[0]["tokenizer"]["sha256"] == manifests[1]["tokenizer"]["sha256"]
    failed = run_train("--pretrained", hf_dir, "--max-steps", 1,
                       "--output-dir", str(tmp_path / "no_tok"), check=False)
    last_line = failed.stderr.strip().splitlines()[-1]
    assert failed.returncode == 2 and "--tokenizer" in last_line, failed.stderr[-2000:]
