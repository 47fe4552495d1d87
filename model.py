"""CLIP in plain PyTorch: a Vision Transformer and a text Transformer trained to agree.

This file holds the network and the reading of published weights into it. Parameter names are
OpenAI's (`visual.conv1`, `transformer.resblocks.0.attn.in_proj_weight`, ...); Hugging Face's map
onto them through HF_NAMES.

    python -c "import model; print(model.CLIP(model.model_config('tiny')))"
    python model.py --export-hf runs/RUN/checkpoints/latest.pt hf_out   # a transformers.CLIPModel
"""
import json
import math
import os
import shutil
import zipfile
from collections import OrderedDict
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file as load_safetensors
from torch.utils.checkpoint import checkpoint

from plumbing import UsageError, file_sha256, run_main


# The pixel statistics OpenAI CLIP normalised its images with, and every CLIP since that loads its
# weights: data.py normalises with them.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class CLIPConfig:
    embed_dim: int = 512          # size of the shared image-text space
    image_size: int = 224
    patch_size: int = 32
    vision_width: int = 768
    vision_layers: int = 12
    vision_head_width: int = 64   # heads = width / head_width, as in OpenCLIP
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 512
    text_heads: int = 8
    text_layers: int = 12
    quick_gelu: bool = False      # OpenAI trained with QuickGELU: match it to load their weights
    # OpenCLIP's options, at its defaults (which are OpenAI's network):
    vision_mlp_ratio: float = 4.0
    vision_ls_init_value: float = None  # LayerScale's first gain; None: no LayerScale
    text_ls_init_value: float = None
    vision_pool_type: str = "tok"       # the class token; "avg": the mean of the patch tokens
    text_pool_type: str = "argmax"      # end-of-text; "first" / "last": that position
    vision_no_ln_pre: bool = False
    text_proj_bias: bool = False


PRESETS = {
    # The published sizes (OpenAI CLIP; QuiltNet-B-32 is ViT-B-32 with quick_gelu).
    "ViT-B-32": CLIPConfig(),
    "ViT-B-16": CLIPConfig(patch_size=16),
    # A CPU-sized model for the demo and the tests: 64 px images, 8 px patches, 4+4 layers.
    # vocab_size is replaced by the size of the tokenizer trained on the captions (see data.py).
    "tiny": CLIPConfig(embed_dim=128, image_size=64, patch_size=8,
                       vision_width=128, vision_layers=4, vision_head_width=32,
                       context_length=32, vocab_size=1024,
                       text_width=128, text_heads=4, text_layers=4),
}

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


def model_config(name_or_path):
    """A preset name, or a JSON file in OpenCLIP's model-config layout, built as OpenCLIP builds
    it (its defaults where the file is silent), or refused naming the key that is not built."""
    if name_or_path in PRESETS:
        return CLIPConfig(**asdict(PRESETS[name_or_path]))
    if not os.path.isfile(name_or_path):
        raise UsageError(f"--model {name_or_path}: not a preset ({', '.join(PRESETS)}) "
                         "nor a JSON file.")
    with open(name_or_path) as f:
        cfg = json.load(f)
    missing = [key for key in ("embed_dim", "vision_cfg", "text_cfg") if key not in cfg]
    if missing:
        raise UsageError(f"--model {name_or_path}: no {', '.join(missing)}; not an OpenCLIP "
                         "model config (embed_dim, vision_cfg{...}, text_cfg{...}).")
    fields = {"patch_size": 16}  # OpenCLIP's default; CLIPConfig's is ViT-B-32's
    fields.update(open_clip_fields(cfg, f"--model {name_or_path}"))
    return CLIPConfig(**fields)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI CLIP was trained with."""
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention with one fused q/k/v projection, named and initialised as OpenAI
    CLIP's nn.MultiheadAttention (in_proj xavier-uniform, out_proj an nn.Linear, zero biases).
    On CPU in bf16, where the fused kernel's backward is ~4x slower, it is written out."""
    def __init__(self, width, heads):
        super().__init__()
        assert width % heads == 0, f"width {width} is not divisible by {heads} heads"
        self.heads = heads
        self.in_proj_weight = nn.Parameter(nn.init.xavier_uniform_(torch.empty(3 * width, width)))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x, is_causal):
        B, L, D = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        # (B, L, D) -> (B, heads, L, head_width)
        q, k, v = (t.view(B, L, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
        if not (x.is_cpu and q.dtype == torch.bfloat16):
            x = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
        else:  # the same attention as matmuls: softmax(q k^T / sqrt(head_width)) v
            scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5          # (B, heads, L, L)
            if is_causal:  # a token sees only the tokens before it
                scores = scores.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), -math.inf)
            x = scores.softmax(dim=-1) @ v
        return self.out_proj(x.transpose(1, 2).reshape(B, L, D))


class LayerScale(nn.Module):
    """A learned gain per channel on a residual branch, started small (CaiT; OpenCLIP's option)."""
    def __init__(self, width, init_value):
        super().__init__()
        self.gamma = nn.Parameter(init_value * torch.ones(width))

    def forward(self, x):
        return x * self.gamma


class ResidualAttentionBlock(nn.Module):
    """Pre-LayerNorm Transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x)); each branch
    scaled by a LayerScale if ls_init_value is set. mlp_ratio * width, truncated, as OpenCLIP."""
    def __init__(self, width, heads, quick_gelu, mlp_ratio=4.0, ls_init_value=None):
        super().__init__()
        mlp_width = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        gelu = QuickGELU() if quick_gelu else nn.GELU()
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, mlp_width)),
                                              ("gelu", gelu),
                                              ("c_proj", nn.Linear(mlp_width, width))]))
        no_scale = ls_init_value is None
        self.ls_1 = nn.Identity() if no_scale else LayerScale(width, ls_init_value)
        self.ls_2 = nn.Identity() if no_scale else LayerScale(width, ls_init_value)

    def forward(self, x, is_causal=False):
        x = x + self.ls_1(self.attn(self.ln_1(x), is_causal))
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, quick_gelu, is_causal, **block_options):
        super().__init__()
        self.width = width
        self.layers = layers
        self.is_causal = is_causal
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, quick_gelu, **block_options)
            for _ in range(layers))
        self.grad_checkpointing = False  # recompute activations in backward: less memory, slower

    def forward(self, x):  # (B, L, width) -> (B, L, width)
        for block in self.resblocks:
            if self.grad_checkpointing and self.training:
                x = checkpoint(block, x, self.is_causal, use_reentrant=False)
            else:
                x = block(x, self.is_causal)
        return x


class VisionTransformer(nn.Module):
    """Initialised as OpenAI and OpenCLIP leave it: PyTorch's defaults (conv1, every block, as
    nn.MultiheadAttention and nn.Linear do), the embeddings and proj N(0, 1/width)."""
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        width = cfg.vision_width
        grid = cfg.image_size // cfg.patch_size
        scale = width ** -0.5
        self.pool_type = cfg.vision_pool_type
        # A convolution with stride = kernel = patch size cuts the image into patches, embeds each.
        self.conv1 = nn.Conv2d(3, width, kernel_size=cfg.patch_size, stride=cfg.patch_size,
                               bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.Identity() if cfg.vision_no_ln_pre else nn.LayerNorm(width)
        heads = width // cfg.vision_head_width
        self.transformer = Transformer(width, cfg.vision_layers, heads, cfg.quick_gelu,
                                       is_causal=False, mlp_ratio=cfg.vision_mlp_ratio,
                                       ls_init_value=cfg.vision_ls_init_value)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, cfg.embed_dim))

    def forward(self, images):                                 # (B, 3, H, W)
        x = self.conv1(images)                                 # (B, width, grid, grid)
        x = x.flatten(2).transpose(1, 2)                       # (B, grid*grid, width)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)                         # (B, 1 + grid*grid, width)
        x = x + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        if self.pool_type == "avg":  # the mean of the patch tokens, the class token left out
            return self.ln_post(x[:, 1:]).mean(dim=1) @ self.proj
        return self.ln_post(x[:, 0]) @ self.proj               # class token -> (B, embed_dim)


# ----------------------------------------------------------------------------- published weights

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
    return CLIPConfig(**fields)


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
    training checkpoint or a Hub folder) or a HF CLIPModel folder -> (state dict, CLIPConfig)."""
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
        return checkpoint["model"], CLIPConfig(**checkpoint["config"])
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


class CLIP(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.config = cfg
        self.visual = VisionTransformer(cfg)
        # The text tower lives at the top level (OpenAI's names); causal: a token sees its past.
        self.transformer = Transformer(cfg.text_width, cfg.text_layers, cfg.text_heads,
                                       cfg.quick_gelu, is_causal=True,
                                       ls_init_value=cfg.text_ls_init_value)
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.text_width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.text_width))
        self.ln_final = nn.LayerNorm(cfg.text_width)
        if cfg.text_proj_bias:  # OpenCLIP's option: an nn.Linear, so its weight is (out, in)
            self.text_projection = nn.Linear(cfg.text_width, cfg.embed_dim)
        else:
            self.text_projection = nn.Parameter(torch.empty(cfg.text_width, cfg.embed_dim))
        # A learned temperature, kept in log space: logits = exp(logit_scale) * cosine similarity.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.init_parameters()

    def init_parameters(self):
        """The text tower's initialisation, OpenAI's (clip/model.py) as OpenCLIP keeps it: normal
        weights whose std shrinks with width (and depth, for the projections back into the
        residual stream); the biases keep PyTorch's defaults. The vision tower is left as built."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        width = self.transformer.width
        proj_std = (width ** -0.5) * ((2 * self.transformer.layers) ** -0.5)
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=width ** -0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        if self.config.text_proj_bias:
            nn.init.normal_(self.text_projection.weight, std=width ** -0.5)
            nn.init.zeros_(self.text_projection.bias)
        else:
            nn.init.normal_(self.text_projection, std=width ** -0.5)

    def set_grad_checkpointing(self, enable=True):
        self.visual.transformer.grad_checkpointing = enable
        self.transformer.grad_checkpointing = enable

    def encode_image(self, images):
        """(B, 3, H, W) normalised pixels -> (B, embed_dim) projected, unnormalised features."""
        return self.visual(images)

    def encode_text(self, tokens):
        """(B, context_length) token ids -> (B, embed_dim) projected, unnormalised features."""
        positions = self.positional_embedding.to(self.token_embedding.weight.dtype)
        x = self.token_embedding(tokens) + positions
        x = self.ln_final(self.transformer(x))                 # (B, context_length, text_width)
        if self.config.text_pool_type == "first":
            x = x[:, 0]
        elif self.config.text_pool_type == "last":
            x = x[:, -1]
        else:  # "argmax": end-of-text, the first position that has seen the whole caption
            # (causal). Our tokenizers give it the largest id (49407 in CLIP's; data.py's last).
            eot = tokens.argmax(dim=-1)
            x = x[torch.arange(x.shape[0], device=x.device), eot]   # (B, text_width)
        if self.config.text_proj_bias:
            return self.text_projection(x)
        return x @ self.text_projection

    def forward(self, images, tokens):
        """What the contrastive loss needs: both towers' unit-length features, exp(logit_scale)."""
        image_features = F.normalize(self.encode_image(images), dim=-1)
        text_features = F.normalize(self.encode_text(tokens), dim=-1)
        return image_features, text_features, self.logit_scale.exp()

    @torch.no_grad()
    def clamp_logit_scale(self):
        """CLIP's paper clips the temperature so logits are scaled by at most 100, in log space."""
        self.logit_scale.clamp_(0, math.log(100))

    @classmethod
    def from_pretrained(cls, path, activation=None):
        """Any weights read_pretrained reads -> CLIP in eval mode, on the CPU, in float32.
        activation: "quick_gelu" or "gelu" overrides what the weights state or imply."""
        state_dict, cfg = read_pretrained(path)
        cfg.quick_gelu = choose_activation(path, cfg.quick_gelu, activation)
        model = cls(cfg)
        expected = model.state_dict()
        # Every parameter once, in the shape the sizes imply: never a silent, half-random load.
        for key in sorted(expected.keys() | state_dict.keys()):
            found = tuple(state_dict[key].shape) if key in state_dict else "nothing"
            needed = tuple(expected[key].shape) if key in expected else "nothing"
            if found != needed:
                raise UsageError(f"{path}: {key} is {found}, "
                                 f"where a CLIP of the sizes it implies needs {needed}.")
        model.load_state_dict(state_dict)
        return model.eval()


# ----------------------------------------------------------------------------- to Hugging Face

# OpenCLIP's options that transformers' CLIPModel (OpenAI's network) has no place for.
NOT_IN_HF = ("vision_ls_init_value", "text_ls_init_value", "vision_pool_type", "text_pool_type",
             "vision_no_ln_pre", "text_proj_bias")


def export_hf(checkpoint, out_dir):
    """Any weights CLIP.from_pretrained reads -> a transformers.CLIPModel folder (+ tokenizer)."""
    import transformers
    model = CLIP.from_pretrained(checkpoint)
    cfg = model.config
    options = [name for name in NOT_IN_HF if getattr(cfg, name) != getattr(CLIPConfig, name)]
    if options:
        raise UsageError(f"{checkpoint}: {', '.join(options)} set, which transformers' "
                         "CLIPModel cannot hold; keep this model in our format.")
    # HF pools at the first eos_token_id: the run's tokenizer's (it may be smaller than the
    # vocabulary), else OpenAI's layout, end-of-text the last id. data.tokenize pads with 0.
    ids = dict(bos_token_id=cfg.vocab_size - 2, eos_token_id=cfg.vocab_size - 1, pad_token_id=0)
    tokenizer_folder = run_tokenizer_folder(checkpoint)
    if tokenizer_folder:
        import data
        tokenizer = data.load_tokenizer(tokenizer_folder)
        ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    act = "quick_gelu" if cfg.quick_gelu else "gelu"
    vision = dict(hidden_size=cfg.vision_width, hidden_act=act,
                  intermediate_size=int(cfg.vision_width * cfg.vision_mlp_ratio),
                  num_hidden_layers=cfg.vision_layers,
                  num_attention_heads=cfg.vision_width // cfg.vision_head_width,
                  image_size=cfg.image_size, patch_size=cfg.patch_size)
    text = dict(hidden_size=cfg.text_width, intermediate_size=4 * cfg.text_width,
                hidden_act=act, num_hidden_layers=cfg.text_layers,
                num_attention_heads=cfg.text_heads, vocab_size=cfg.vocab_size,
                max_position_embeddings=cfg.context_length, **ids)
    hf_model = transformers.CLIPModel(transformers.CLIPConfig(
        projection_dim=cfg.embed_dim, vision_config=vision, text_config=text))
    state_dict = model.state_dict()
    hf_state_dict = {}
    # hf_to_openai, inverted: the projections transposed back, in_proj split into q, k, v.
    for ours, theirs in hf_key_map(cfg.vision_layers, cfg.text_layers).items():
        tensor = state_dict[ours].T if ours in TRANSPOSED else state_dict[ours]
        parts = tensor.chunk(len(theirs)) if len(theirs) > 1 else [tensor]
        hf_state_dict.update(zip(theirs, parts))
    hf_model.load_state_dict(hf_state_dict, strict=True)  # every HF weight set, none left over
    hf_model.save_pretrained(out_dir)
    if tokenizer_folder:  # else transformers.AutoTokenizer finds a 2-token default there
        shutil.copytree(tokenizer_folder, out_dir, dirs_exist_ok=True)


def main(argv=None):
    import argparse
    parser = argparse.ArgumentParser(
        description="Write weights that CLIP.from_pretrained reads as a HF CLIPModel folder.")
    parser.add_argument("--export-hf", nargs=2, metavar=("CHECKPOINT", "OUT_DIR"), required=True)
    export_hf(*parser.parse_args(argv).export_hf)


if __name__ == "__main__":
    run_main(main)
