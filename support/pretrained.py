"""Published weights into our CLIP: OpenAI's (TorchScript or a state dict), OpenCLIP's (weights,
a training checkpoint, a Hub folder, a model-config JSON) and Hugging Face's CLIPModel folders,
each through one explicit key map with its sizes read from the shapes. model.CLIP.from_pretrained
is the entry; nothing here builds a network."""
import json
import os
import zipfile

import torch
from safetensors.torch import load_file as load_safetensors

from support.errors import UsageError
from support.files import file_sha256


# The pixel statistics OpenAI CLIP normalised its images with, and every CLIP since that loads its
# weights: data.py normalises with them.

# The pixel statistics OpenAI CLIP normalised its images with, and every CLIP since that loads its
# weights: data.py normalises with them.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)


CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# An OpenCLIP model config (its model_configs/*.json): each key built here -> our field.
OPEN_CLIP_KEYS = {
    "": {"embed_dim": "embed_dim", "quick_gelu": "quick_gelu"},
    "vision_cfg": {"image_size": "image_size", "patch_size": "patch_size",
                   "width": "vision_width", "layers": "vision_layers",
                   "head_width": "vision_head_width", "mlp_ratio": "vision_mlp_ratio",
                   "ls_init_value": "vision_ls_init_value", "pool_type": "vision_pool_type",
                   "no_ln_pre": "vision_no_ln_pre"},
    "text_cfg": {"context_length": "context_length", "vocab_size": "vocab_size",
                 "width": "text_width", "heads": "text_heads", "layers": "text_layers",
                 "ls_init_value": "text_ls_init_value", "pool_type": "text_pool_type",
                 "proj_bias": "text_proj_bias"},
}


# Keys accepted only at the default of OpenCLIP's CLIPVisionCfg / CLIPTextCfg / CLIP, where
# they change nothing in the network. Any other key or value is refused by name.
OPEN_CLIP_DEFAULTS = {
    "": {"custom_text": False, "init_logit_bias": None},
    "vision_cfg": {"patch_dropout": 0.0, "attentional_pool": False, "pos_embed_type": "learnable",
                   "final_ln_after_pool": False, "output_tokens": False, "act_kwargs": None,
                   "norm_kwargs": None, "block_type": None, "timm_model_name": None},
    "text_cfg": {"mlp_ratio": 4.0, "embed_cls": False, "no_causal_mask": False,
                 "final_ln_after_pool": False, "proj_type": "linear", "output_tokens": False,
                 "act_kwargs": None, "norm_kwargs": None, "block_type": None,
                 "hf_model_name": None, "hf_tokenizer_name": None, "tokenizer_kwargs": None},
}


POOL_TYPES = {"vision_cfg": ("tok", "avg"), "text_cfg": ("argmax", "first", "last")}


def open_clip_fields(cfg, source):
    """An OpenCLIP model config (the dict) -> the CLIPConfig fields it sets (see model_config)."""
    fields = {}
    for section, built in OPEN_CLIP_KEYS.items():
        defaults = OPEN_CLIP_DEFAULTS[section]
        values = cfg.get(section, {}) if section else cfg
        for key, value in values.items():
            name = f"{section}.{key}".lstrip(".")
            if key == "pool_type" and section in POOL_TYPES and value not in POOL_TYPES[section]:
                raise UsageError(f"{source}: {name} {value!r} is not built here; "
                                 f"use one of {', '.join(POOL_TYPES[section])}.")
            if key in built:
                fields[built[key]] = value
            elif key not in OPEN_CLIP_KEYS and (key not in defaults or defaults[key] != value):
                raise UsageError(f"{source}: {name} = {json.dumps(value)} is not "
                                 "built here; remove it, or train this model with OpenCLIP.")
    if not isinstance(fields.get("vision_layers", 12), int):
        raise UsageError(f"{source}: vision_cfg.layers is a list, a ResNet tower; "
                         "only ViTs are built here.")
    return fields


# Our names (OpenAI's) -> the Hugging Face CLIPModel names each is made of; "{}": weight and bias.
HF_NAMES = {
    "visual.conv1.weight":         ("vision_model.embeddings.patch_embedding.weight",),
    "visual.class_embedding":      ("vision_model.embeddings.class_embedding",),
    "visual.positional_embedding": ("vision_model.embeddings.position_embedding.weight",),
    "visual.ln_pre.{}":            ("vision_model.pre_layrnorm.{}",),  # sic: HF's spelling
    "visual.ln_post.{}":           ("vision_model.post_layernorm.{}",),
    "visual.proj":                 ("visual_projection.weight",),      # transposed: see TRANSPOSED
    "token_embedding.weight":      ("text_model.embeddings.token_embedding.weight",),
    "positional_embedding":        ("text_model.embeddings.position_embedding.weight",),
    "ln_final.{}":                 ("text_model.final_layer_norm.{}",),
    "text_projection":             ("text_projection.weight",),        # transposed
    "logit_scale":                 ("logit_scale",),
}


HF_BLOCK_NAMES = {  # every residual block of both towers; q, k and v are stacked into in_proj
    "ln_1.{}":          ("layer_norm1.{}",),
    "attn.in_proj_{}":  ("self_attn.q_proj.{}", "self_attn.k_proj.{}", "self_attn.v_proj.{}"),
    "attn.out_proj.{}": ("self_attn.out_proj.{}",),
    "ln_2.{}":          ("layer_norm2.{}",),
    "mlp.c_fc.{}":      ("mlp.fc1.{}",),
    "mlp.c_proj.{}":    ("mlp.fc2.{}",),
}


TRANSPOSED = ("visual.proj", "text_projection")  # (in, out) here; HF's nn.Linear is (out, in)


def hf_key_map(vision_layers, text_layers):
    """The tables above, spelled out: our name -> the tuple of HF names, for every parameter."""
    rows = dict(HF_NAMES)
    towers = (("visual.transformer.resblocks", "vision_model.encoder.layers", vision_layers),
              ("transformer.resblocks", "text_model.encoder.layers", text_layers))
    for ours, theirs, layers in towers:
        for i in range(layers):
            for our_name, hf_names in HF_BLOCK_NAMES.items():
                rows[f"{ours}.{i}.{our_name}"] = tuple(f"{theirs}.{i}.{n}" for n in hf_names)
    key_map = {}
    for ours, theirs in rows.items():
        params = ("weight", "bias") if "{}" in ours else ("",)
        for param in params:
            key_map[ours.format(param)] = tuple(name.format(param) for name in theirs)
    return key_map


def count_layers(state_dict, prefix):
    """The number of residual blocks under `prefix` ("transformer.resblocks."): distinct indices."""
    return len({key.split(".")[prefix.count(".")] for key in state_dict if key.startswith(prefix)})


def hf_to_openai(hf, source):
    """A HF CLIPModel state dict -> ours: q, k, v fused into in_proj, the projections transposed."""
    key_map = hf_key_map(count_layers(hf, "vision_model.encoder.layers."),
                         count_layers(hf, "text_model.encoder.layers."))
    used = {name for theirs in key_map.values() for name in theirs}
    state_dict = {k: v for k, v in hf.items() if k not in used}  # from_pretrained refuses these
    for ours, theirs in key_map.items():
        if any(name not in hf or hf[name].shape != hf[theirs[0]].shape for name in theirs):
            raise UsageError(f"{source}: {' or '.join(theirs)} missing, "
                             "or q, k, v of unequal shapes.")
        tensor = torch.cat([hf[name] for name in theirs]) if len(theirs) > 1 else hf[theirs[0]]
        state_dict[ours] = tensor.T if ours in TRANSPOSED else tensor
    return state_dict


def mlp_ratio(state_dict, width):
    """The vision tower's MLP width over its width, such that ResidualAttentionBlock's truncation
    gives that MLP width back: 4.0 for OpenAI's. 448 x (453 / 448) is 452.99..., so a ratio
    that misses is nudged up by half a unit of MLP width."""
    mlp_width = state_dict["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    ratio = mlp_width / width
    if int(width * ratio) != mlp_width:
        ratio = (mlp_width + 0.5) / width
    return ratio


def infer_config(state_dict, folder, hf_names):
    """Sizes, the vision MLP's included, from the weights' shapes, as OpenAI's build_model does.
    Heads, activation and OpenCLIP's options, which shapes cannot tell, from a config beside the
    weights, else OpenAI's 64-wide heads and no activation (None: choose_activation decides)."""
    vision_width, _, patch_size, _ = state_dict["visual.conv1.weight"].shape  # (width, 3, p, p)
    positions = state_dict["visual.positional_embedding"].shape[0]            # 1 + grid*grid
    context_length, text_width = state_dict["positional_embedding"].shape
    fields = dict(
        vision_mlp_ratio=mlp_ratio(state_dict, vision_width),
        embed_dim=state_dict["text_projection"].shape[1],
        image_size=round((positions - 1) ** 0.5) * patch_size,
        patch_size=patch_size, vision_width=vision_width, context_length=context_length,
        vision_layers=count_layers(state_dict, "visual.transformer.resblocks."),
        text_width=text_width, vocab_size=state_dict["token_embedding.weight"].shape[0],
        text_layers=count_layers(state_dict, "transformer.resblocks."),
        quick_gelu=None, vision_head_width=64, text_heads=text_width // 64)
    open_clip_json = os.path.join(folder, "open_clip_config.json")
    if hf_names and os.path.isfile(os.path.join(folder, "config.json")):
        import transformers  # it knows the defaults that its config.json leaves out
        config = transformers.CLIPConfig.from_pretrained(folder, local_files_only=True)
        vision = config.vision_config
        text = config.text_config
        fields.update(quick_gelu=text.hidden_act == "quick_gelu",
                      text_heads=text.num_attention_heads,
                      vision_head_width=vision.hidden_size // vision.num_attention_heads)
    elif os.path.isfile(open_clip_json):  # OpenCLIP's, next to its Hub weights
        with open(open_clip_json) as f:
            model_cfg = json.load(f).get("model_cfg", {})
        # Built as OpenCLIP builds it: where the config is silent, its defaults (GELU, 8 heads).
        fields.update(quick_gelu=False, text_heads=8)
        fields.update(open_clip_fields(model_cfg, open_clip_json))
    return fields


def choose_activation(path, stated, activation):
    """QuickGELU (True) or GELU: --activation if given, else what the weights' config states,
    else OpenAI's QuickGELU, said aloud: the shapes of the weights cannot tell them apart."""
    if activation is None and stated is None:
        print(f"note: {path} gives no activation; assuming QuickGELU (OpenAI's). "
              "Pass --activation gelu if these weights were trained with GELU.")
        return True
    if activation is None:
        return stated
    wanted = {"quick_gelu": True, "gelu": False}[activation]
    if stated not in (None, wanted):
        print(f"note: {path} states quick_gelu={stated}; --activation {activation} overrides it.")
    return wanted


def note_other_pixel_statistics(folder):
    """Say so when a config beside the weights states other pixel statistics than CLIP_MEAN and
    CLIP_STD: such weights load, but would see every image normalised otherwise than in their
    training (zero-shot scores off; fine-tuning adapts)."""
    stated = {}
    for name, mean, std in (("open_clip_config.json", "mean", "std"),
                            ("preprocessor_config.json", "image_mean", "image_std")):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path) as f:
                config = json.load(f)
            config = config.get("preprocess_cfg", config)  # OpenCLIP's nests it
            stated.update(mean=config.get(mean), std=config.get(std), path=path)
    for key, ours in (("mean", CLIP_MEAN), ("std", CLIP_STD)):
        theirs = stated.get(key)
        if theirs and max(abs(a - b) for a, b in zip(theirs, ours)) > 1e-3:
            print(f"note: {stated['path']} states pixel {key} {theirs}; data.py normalises with "
                  f"CLIP's {list(ours)}, so these weights see other inputs than in training.")


# OpenAI's ViT CLIPs as published (TorchScript), by the sha256 in their URLs (clip/clip.py).
OPENAI_JIT_SHA256 = {
    "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af": "ViT-B-32.pt",
    "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f": "ViT-B-16.pt",
    "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836": "ViT-L-14.pt",
    "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02": "ViT-L-14-336px.pt",
}


def read_weights_file(path):
    """One file -> the dict it holds, without running code from it."""
    try:
        if path.endswith(".safetensors"):
            return load_safetensors(path)
        names = zipfile.ZipFile(path).namelist() if zipfile.is_zipfile(path) else []
        if any(name.endswith("constants.pkl") for name in names):
            # A TorchScript archive is a program (torch.jit.load runs it): we open OpenAI's only.
            if file_sha256(path) not in OPENAI_JIT_SHA256:
                raise UsageError(f"{path}: a TorchScript archive that OpenAI did not publish; "
                                 "if you trust it, save its weights first: "
                                 "torch.save(torch.jit.load(PATH).state_dict(), OUT).")
            return torch.jit.load(path, map_location="cpu").state_dict()
        return torch.load(path, map_location="cpu", weights_only=True)  # tensors, no objects
    except UsageError:
        raise
    except Exception as e:  # truncated, or not a weights file at all: say so in one line
        reason = f"{type(e).__name__}: {str(e).strip()[:160]!r}"
        raise UsageError(f"{path}: not a readable weights file ({reason}).")


def read_pretrained(path):
    """Ours (RUN/checkpoints/*.pt), OpenAI's (TorchScript or state dict), OpenCLIP's (weights, a
    training checkpoint or a Hub folder) or a HF CLIPModel folder -> (state dict, the
    model.CLIPConfig fields)."""
    if os.path.isdir(path):  # a HF CLIPModel's, else OpenCLIP's files as on the Hub
        names = ("model.safetensors", "pytorch_model.bin",
                 "open_clip_model.safetensors", "open_clip_pytorch_model.bin")
        found = [name for name in names if os.path.isfile(os.path.join(path, name))]
        if not found:
            raise UsageError(f"{path}: a folder without weights; looked for {', '.join(names)}.")
        path = os.path.join(path, found[0])
    checkpoint = read_weights_file(path)
    if not isinstance(checkpoint, dict):
        raise UsageError(f"{path}: holds a {type(checkpoint).__name__}, not a state dict.")
    if "model" in checkpoint and "config" in checkpoint:  # one of ours: train.py's save_checkpoint
        return checkpoint["model"], dict(checkpoint["config"])
    # Unwrap OpenCLIP's training checkpoints; strip DDP's and torch.compile's prefixes; drop what
    # is no weight: OpenAI's three ints and the position_ids buffers of older transformers.
    openai_ints = ("input_resolution", "context_length", "vocab_size")
    state_dict = {}
    for key, value in checkpoint.get("state_dict", checkpoint).items():
        if key not in openai_ints and not key.endswith("position_ids"):
            state_dict[key.removeprefix("module.").removeprefix("_orig_mod.")] = value
    hf_names = any(key.startswith("text_model.") for key in state_dict)
    if hf_names:
        state_dict = hf_to_openai(state_dict, path)
    logit_scale = state_dict.get("logit_scale")
    if torch.is_tensor(logit_scale) and logit_scale.numel() == 1:
        state_dict["logit_scale"] = logit_scale.reshape(())  # a scalar here, 1-d in some files
    try:
        note_other_pixel_statistics(os.path.dirname(path))
        return state_dict, infer_config(state_dict, os.path.dirname(path), hf_names)
    except (KeyError, ValueError, AttributeError) as e:
        raise UsageError(f"{path}: not a ViT CLIP of ours, OpenAI, OpenCLIP or HF "
                         f"({type(e).__name__}: {e!s:.160}).")


def run_tokenizer_folder(checkpoint):
    """RUN/checkpoints/X.pt -> RUN/tokenizer, the tokenizer that run trained with; else None."""
    checkpoints = os.path.dirname(os.path.abspath(checkpoint))
    folder = os.path.join(os.path.dirname(checkpoints), "tokenizer")
    if os.path.basename(checkpoints) == "checkpoints" and os.path.isdir(folder):
        return folder
    return None
