"""Published weights as they are downloaded: an OpenCLIP Hub folder (open_clip_pytorch_model.bin
or open_clip_model.safetensors beside open_clip_config.json, as OpenCLIP's push_to_hf_hub writes
it) loads with the same outputs, takes its sizes, heads and activation from the config, and may
hold its tokenizer; where nothing states the activation the guess is printed and --activation
overrides it.

Everything is built here, tiny and random: nothing is downloaded.
    OMP_NUM_THREADS=1 python -m pytest -q tests/test_openclip_folder.py
"""
import json
import os
from dataclasses import asdict

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import transformers
from safetensors.torch import save_file
from tokenizers import pre_tokenizers

import data
import train
from model import CLIP, CLIPConfig
from support.distributed import Process
from support.errors import UsageError

# 16-wide vision heads and 2 text heads: sizes that only the config can tell (OpenAI's are 64).
CFG = CLIPConfig(embed_dim=24, image_size=32, patch_size=8, vision_width=64, vision_layers=2,
                 vision_head_width=16, context_length=16, vocab_size=514, text_width=64,
                 text_heads=2, text_layers=2)


def open_clip_key_names(vision_layers, text_layers):
    """The names OpenCLIP's CLIP gives a ViT's parameters (open_clip/model.py, transformer.py:
    OpenAI's names; its attn_mask buffer is not persistent), written from its source."""
    block = ["ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias",
             "attn.out_proj.weight", "attn.out_proj.bias", "ln_2.weight", "ln_2.bias",
             "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias"]
    names = {"visual.class_embedding", "visual.positional_embedding", "visual.proj",
             "visual.conv1.weight", "visual.ln_pre.weight", "visual.ln_pre.bias",
             "visual.ln_post.weight", "visual.ln_post.bias", "token_embedding.weight",
             "positional_embedding", "ln_final.weight", "ln_final.bias", "text_projection",
             "logit_scale"}
    for i in range(vision_layers):
        names.update(f"visual.transformer.resblocks.{i}.{name}" for name in block)
    for i in range(text_layers):
        names.update(f"transformer.resblocks.{i}.{name}" for name in block)
    return names


def random_clip(quick_gelu, **sizes):
    """A CLIP of CFG's sizes with every parameter perturbed (LayerNorms and biases included)."""
    torch.manual_seed(0)
    model = CLIP(CLIPConfig(**{**asdict(CFG), **sizes, "quick_gelu": quick_gelu})).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


def open_clip_config(quick_gelu):
    """open_clip_config.json as OpenCLIP writes it: {"model_cfg": the model config it was built
    from, "preprocess_cfg": ...}; "quick_gelu" appears only in the configs that set it."""
    model_cfg = {
        "embed_dim": CFG.embed_dim,
        "vision_cfg": {"image_size": CFG.image_size, "layers": CFG.vision_layers,
                       "width": CFG.vision_width, "head_width": CFG.vision_head_width,
                       "patch_size": CFG.patch_size},
        "text_cfg": {"context_length": CFG.context_length, "vocab_size": CFG.vocab_size,
                     "width": CFG.text_width, "heads": CFG.text_heads,
                     "layers": CFG.text_layers}}
    if quick_gelu:
        model_cfg["quick_gelu"] = True
    preprocess_cfg = {"mean": [0.48145466, 0.4578275, 0.40821073],
                      "std": [0.26862954, 0.26130258, 0.27577711]}
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}


def write_clip_tokenizer(folder):
    """A CLIPTokenizer (bytes, bytes ending a word, start- and end-of-text last) saved as the Hub
    holds it: vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json, ..."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = alphabet + [c + "</w>" for c in alphabet] + [data.SOT, data.EOT]
    os.makedirs(folder / "raw")
    (folder / "raw" / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "raw" / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(folder / "raw"))
    tokenizer.save_pretrained(str(folder))


def save_hub_folder(folder, model, weights_name, quick_gelu):
    """The files of an OpenCLIP Hub repository: the weights, the config and the tokenizer."""
    state_dict = model.state_dict()
    if weights_name.endswith(".safetensors"):
        save_file(state_dict, str(folder / weights_name))
    else:
        torch.save(state_dict, folder / weights_name)
    (folder / "open_clip_config.json").write_text(json.dumps(open_clip_config(quick_gelu)))
    write_clip_tokenizer(folder)
    return str(folder)


def assert_same_outputs(loaded, original):
    torch.testing.assert_close(loaded.state_dict(), original.state_dict(), rtol=0, atol=0)
    images = torch.randn(3, 3, CFG.image_size, CFG.image_size)
    tokens = torch.randint(1, CFG.vocab_size, (3, CFG.context_length))
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), original.encode_image(images))
        assert torch.equal(loaded.encode_text(tokens), original.encode_text(tokens))


def test_our_parameter_names_are_open_clips():
    assert set(CLIP(CFG).state_dict()) == open_clip_key_names(CFG.vision_layers, CFG.text_layers)


@pytest.mark.parametrize("weights_name", ["open_clip_pytorch_model.bin",
                                          "open_clip_model.safetensors"])
@pytest.mark.parametrize("quick_gelu", [True, False], ids=["quick_gelu", "silent_so_gelu"])
def test_open_clip_hub_folder_loads_with_the_same_outputs(tmp_path, capsys, weights_name,
                                                          quick_gelu):
    original = random_clip(quick_gelu)
    folder = save_hub_folder(tmp_path, original, weights_name, quick_gelu)
    loaded = CLIP.from_pretrained(folder)
    assert loaded.config == original.config  # heads and activation from the config
    assert_same_outputs(loaded, original)
    assert "note:" not in capsys.readouterr().out  # the config states the activation
    # The tokenizer beside the weights is a --tokenizer folder as it is.
    tokenizer = data.load_tokenizer(folder)
    assert tokenizer.eos_token_id == len(tokenizer) - 1
    tokens = data.tokenize(tokenizer, ["ab"], 8)[0].tolist()  # a, b</w>: no merges here
    assert tokens[0] == tokenizer.bos_token_id and tokens[3:5] == [tokenizer.eos_token_id, 0]


def test_weights_trained_on_other_pixel_statistics_are_said_aloud(tmp_path, capsys):
    folder = save_hub_folder(tmp_path, random_clip(True), "open_clip_model.safetensors", True)
    config = open_clip_config(quick_gelu=True)
    config["preprocess_cfg"]["mean"] = [0.485, 0.456, 0.406]  # ImageNet's, not CLIP's
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    CLIP.from_pretrained(folder)
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "open_clip_config.json states pixel mean [0.485" in notes[0]
    # A HF folder states them in preprocessor_config.json; CLIP's own pass without a word.
    hf_config = {"image_mean": list(data.CLIP_MEAN), "image_std": [0.229, 0.224, 0.225]}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(hf_config))
    (tmp_path / "open_clip_config.json").write_text(json.dumps(open_clip_config(True)))
    CLIP.from_pretrained(folder)
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "preprocessor_config.json states pixel std [0.229" in notes[0]


def test_open_clip_options_come_from_its_config(tmp_path):
    options = {"mlp_ratio": 2.0, "ls_init_value": 0.1, "pool_type": "avg", "no_ln_pre": True}
    fields = {"vision_mlp_ratio": 2.0, "vision_ls_init_value": 0.1, "vision_pool_type": "avg",
              "vision_no_ln_pre": True}
    torch.manual_seed(0)
    original = CLIP(CLIPConfig(**{**asdict(CFG), **fields})).eval()
    config = open_clip_config(quick_gelu=False)
    config["model_cfg"]["vision_cfg"].update(options)
    torch.save(original.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    loaded = CLIP.from_pretrained(str(tmp_path))
    assert loaded.config == original.config
    assert_same_outputs(loaded, original)
    # One translation, so one set of refusals: what --model refuses, the folder refuses too.
    config["model_cfg"]["vision_cfg"]["patch_dropout"] = 0.5
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(UsageError, match="vision_cfg.patch_dropout = 0.5 is not built here"):
        CLIP.from_pretrained(str(tmp_path))


def test_unstated_activation_is_printed_and_the_flag_overrides_it(tmp_path, capsys):
    # A bare file, no config beside it: the heads are OpenAI's, 64 wide, and the activation?
    gelu_model = random_clip(quick_gelu=False, vision_head_width=64, text_heads=1)
    path = str(tmp_path / "open_clip_pytorch_model.bin")
    torch.save(gelu_model.state_dict(), path)
    guessed = CLIP.from_pretrained(path)
    note = capsys.readouterr().out
    assert note.count("\n") == 1
    assert f"note: {path} gives no activation; assuming QuickGELU (OpenAI's)" in note
    assert "--activation gelu" in note
    assert guessed.config.quick_gelu
    overridden = CLIP.from_pretrained(path, activation="gelu")
    assert capsys.readouterr().out == ""  # the user said which: nothing to note
    assert not overridden.config.quick_gelu
    assert_same_outputs(overridden, gelu_model)


def test_activation_flag_wins_over_a_config_with_a_note(tmp_path, capsys):
    folder = save_hub_folder(tmp_path, random_clip(quick_gelu=True),
                             "open_clip_pytorch_model.bin", quick_gelu=True)
    assert CLIP.from_pretrained(folder, activation="quick_gelu").config.quick_gelu
    assert capsys.readouterr().out == ""  # agrees with the config
    assert not CLIP.from_pretrained(folder, activation="gelu").config.quick_gelu
    note = capsys.readouterr().out
    assert "states quick_gelu=True; --activation gelu overrides it" in note


def test_train_flags_reach_the_model(tmp_path, capsys):
    folder = save_hub_folder(tmp_path, random_clip(quick_gelu=True),
                             "open_clip_model.safetensors", quick_gelu=True)
    proc = Process(0, 1, torch.device("cpu"))
    os.makedirs(tmp_path / "run")
    flags = ["--pretrained", folder, "--tokenizer", folder, "--activation", "gelu"]
    args = train.parse_args(flags)
    tokenizer, model, _ = train.build_model(args, [], str(tmp_path / "run"), proc,
                                          train.Stopwatch())
    assert not model.config.quick_gelu
    assert len(tokenizer) == CFG.vocab_size
    assert "overrides it" in capsys.readouterr().out
    with pytest.raises(UsageError, match="--activation applies to --pretrained"):
        train.parse_args(["--activation", "gelu"])  # refused before any data is read


def test_folder_without_weights_is_refused_naming_the_files_looked_for(tmp_path):
    (tmp_path / "open_clip_config.json").write_text(json.dumps(open_clip_config(True)))
    with pytest.raises(UsageError) as refusal:
        CLIP.from_pretrained(str(tmp_path))
    message = str(refusal.value)
    assert "\n" not in message and str(tmp_path) in message
    for name in ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors",
                 "open_clip_pytorch_model.bin"):
        assert name in message
