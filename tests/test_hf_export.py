"""The Hugging Face export as HF users use it: CLIPProcessor.from_pretrained(folder) on a demo
JPEG and two captions, padded, fed to CLIPModel, gives the embeddings of our evaluate.py path
(data.eval_transform, data.tokenize, CLIP.encode_image / encode_text); the folder's configs agree
with each other, its files are readable by others, and a target that cannot hold the export is
refused before any weights are read. Quick: a random tiny model, nothing trained.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_hf_export.py
"""
import csv
import json
import os
import shutil
import time
from dataclasses import asdict

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F
import transformers
from PIL import Image

import data
import model
from conftest import export_hf
from model import CLIP, CLIPConfig, model_config
from support.errors import UsageError
from support.pretrained import CLIP_MEAN, CLIP_STD
from test_pretrained import write_clip_tokenizer

CAPTIONS = ["H&E section of colon adenocarcinoma.", "benign lung"]


@pytest.fixture(scope="module", params=["trained_bpe", "clip_bpe"])
def exported(request, demo_csv, tmp_path_factory):
    """A run folder of a random tiny CLIP (its tokenizer: one trained on the demo's captions, as
    train.py makes it, or a CLIP BPE folder), exported: (our model, our tokenizer, the folder)."""
    run = tmp_path_factory.mktemp(request.param) / "run"
    os.makedirs(run / "checkpoints")
    if request.param == "trained_bpe":
        with open(demo_csv, newline="") as f:
            captions = [row["caption"] for row in csv.DictReader(f)]
        data.train_tokenizer(captions, str(run / "tokenizer"), 1024)
    else:
        write_clip_tokenizer(str(run / "tokenizer"))
    tokenizer = data.load_tokenizer(str(run / "tokenizer"))
    cfg = CLIPConfig(**{**asdict(model_config("tiny")), "vocab_size": len(tokenizer)})
    torch.manual_seed(0)
    ours = CLIP(cfg).eval()
    checkpoint = str(run / "checkpoints" / "latest.pt")
    torch.save({"model": ours.state_dict(), "config": asdict(cfg), "step": 0}, checkpoint)
    out_dir = str(run.parent / "hf_out")
    export_hf(checkpoint, out_dir)
    return ours, tokenizer, out_dir


@pytest.fixture(scope="module")
def demo_image(demo_csv):
    """A real demo JPEG (96 x 96, so that the tiny model's 64 px means a resize)."""
    with open(demo_csv, newline="") as f:
        first = next(csv.DictReader(f))["image_path"]
    return Image.open(os.path.join(os.path.dirname(demo_csv), first))


@torch.no_grad()
def our_embeddings(ours, tokenizer, image):
    """The evaluate.py path: eval_transform, tokenize, the towers; unit vectors."""
    pixels = data.eval_transform(ours.config.image_size)(image.convert("RGB"))[None]
    tokens = data.tokenize(tokenizer, CAPTIONS, ours.config.context_length)
    return (F.normalize(ours.encode_image(pixels), dim=-1),
            F.normalize(ours.encode_text(tokens), dim=-1))


@torch.no_grad()
def hf_embeddings(folder, image, **processor_options):
    """The three lines of the README: CLIPProcessor and CLIPModel from the folder."""
    processor = transformers.CLIPProcessor.from_pretrained(folder, **processor_options)
    hf_model = transformers.CLIPModel.from_pretrained(folder).eval()
    inputs = processor(images=image, text=CAPTIONS, padding=True, return_tensors="pt")
    outputs = hf_model(**inputs)
    return outputs.image_embeds, outputs.text_embeds, inputs


def test_clipprocessor_and_clipmodel_give_our_embeddings(exported, demo_image):
    ours, tokenizer, folder = exported
    our_image, our_text = our_embeddings(ours, tokenizer, demo_image)
    # The PIL backend resizes as torchvision's Resize on a PIL image does: the same pixels.
    hf_image, hf_text, inputs = hf_embeddings(folder, demo_image, backend="pil")
    torch.testing.assert_close(hf_image, our_image, atol=1e-5, rtol=0)
    torch.testing.assert_close(hf_text, our_text, atol=1e-5, rtol=0)
    # padding=True pads to the longest caption; the ids are data.tokenize's, padded with 0 too.
    ours_ids = data.tokenize(tokenizer, CAPTIONS, ours.config.context_length)
    length = inputs["input_ids"].shape[1]
    assert torch.equal(inputs["input_ids"], ours_ids[:, :length])
    up_to_end_of_text = torch.arange(length) <= ours_ids.argmax(1)[:, None]
    assert torch.equal(inputs["attention_mask"], up_to_end_of_text.long())


def test_the_default_torchvision_resize_is_the_closest_hf_gives(exported, demo_image):
    ours, tokenizer, folder = exported
    our_image, our_text = our_embeddings(ours, tokenizer, demo_image)
    hf_image, hf_text, inputs = hf_embeddings(folder, demo_image)
    assert type(transformers.CLIPProcessor.from_pretrained(folder).image_processor).__name__ \
        == "CLIPImageProcessor"  # transformers 5 picks its torchvision backend by default
    # Its bicubic kernel is not PIL's: pixels up to 2 levels in 255 apart (measured: 1 on this
    # tile, 2 on other sizes), 1.9e-5 in the image embedding of this random model. Text: equal.
    pixels = data.eval_transform(ours.config.image_size)(demo_image.convert("RGB"))
    levels = ((inputs["pixel_values"][0] - pixels) * torch.tensor(CLIP_STD).view(3, 1, 1) * 255)
    assert 0 < levels.abs().max() <= 2 + 1e-3
    difference = (hf_image - our_image).abs().max().item()
    print(f"torchvision backend: pixels {levels.abs().max():.2f} levels apart, image embedding "
          f"{difference:.1e}")
    assert difference < 1e-3
    torch.testing.assert_close(hf_text, our_text, atol=1e-5, rtol=0)


def test_the_folder_is_laid_out_as_the_hubs_clip_folders(exported):
    ours, tokenizer, folder = exported
    cfg = ours.config
    config = json.load(open(os.path.join(folder, "config.json")))
    assert config["projection_dim"] == config["text_config"]["projection_dim"] \
        == config["vision_config"]["projection_dim"] == cfg.embed_dim
    assert config["text_config"]["max_position_embeddings"] == cfg.context_length
    assert config["text_config"]["pad_token_id"] == 0
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    assert hf_tokenizer.pad_token_id == 0 and hf_tokenizer.model_max_length == cfg.context_length
    assert hf_tokenizer.eos_token_id == config["text_config"]["eos_token_id"]
    preprocessor = json.load(open(os.path.join(folder, "preprocessor_config.json")))
    assert preprocessor["image_processor_type"] == "CLIPImageProcessor"
    assert preprocessor["size"] == {"shortest_edge": cfg.image_size}
    assert preprocessor["crop_size"] == {"height": cfg.image_size, "width": cfg.image_size}
    assert preprocessor["do_center_crop"] and preprocessor["resample"] == Image.Resampling.BICUBIC
    assert preprocessor["rescale_factor"] == pytest.approx(1 / 255)
    assert preprocessor["image_mean"] == list(CLIP_MEAN)
    assert preprocessor["image_std"] == list(CLIP_STD)
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(folder):  # model.safetensors included, which safetensors makes 0600
        assert os.stat(os.path.join(folder, name)).st_mode & 0o777 == 0o666 & ~umask, name


@pytest.mark.parametrize("case", ["an existing file", "a folder holding files", "inside a file"])
def test_an_export_target_that_cannot_hold_it_is_refused_before_the_weights_are_read(
        case, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("mine")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("mine")
    out_dir, cause = {"an existing file": (tmp_path / "file", "is a file, not a folder"),
                      "a folder holding files": (tmp_path / "folder", "is not empty"),
                      "inside a file": (tmp_path / "file" / "hf", "is a file, not a folder")}[case]

    def no_reading(*args, **kwargs):
        raise AssertionError("the weights were read")
    monkeypatch.setattr(CLIP, "from_pretrained", no_reading)
    started = time.monotonic()
    with pytest.raises(UsageError) as error:
        model.main(["--export-hf", str(tmp_path / "no_such.pt"), str(out_dir)])
    seconds = time.monotonic() - started
    message = str(error.value)
    assert "\n" not in message and str(out_dir) in message and cause in message, message
    assert seconds < 1, f"{seconds:.2f} s to refuse {out_dir}"
    assert (tmp_path / "file").read_text() == "mine"  # nothing written over


def test_an_empty_existing_folder_receives_the_export(exported, tmp_path):
    _, _, folder = exported
    (tmp_path / "empty").mkdir()
    shutil.copy(os.path.join(os.path.dirname(folder), "run", "checkpoints", "latest.pt"),
                tmp_path / "weights.pt")  # outside a run folder: no tokenizer to take along
    export_hf(str(tmp_path / "weights.pt"), str(tmp_path / "empty") + "/")
    assert "model.safetensors" in os.listdir(tmp_path / "empty")
    assert "preprocessor_config.json" in os.listdir(tmp_path / "empty")
    assert not [name for name in os.listdir(tmp_path) if ".tmp" in name]
