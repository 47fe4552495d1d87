"""CLIP in plain PyTorch: a Vision Transformer and a text Transformer trained to agree.

This file holds the network and its configurations. Parameter names are OpenAI's (`visual.conv1`,
`transformer.resblocks.0.attn.in_proj_weight`, ...), so that published weights load by name:
support/pretrained.py reads OpenAI's, OpenCLIP's and Hugging Face's files into them, and
support/hf_export.py writes ours as a Hugging Face folder.

    python -c "import model; print(model.CLIP(model.model_config('tiny')))"
    python model.py --export-hf runs/RUN/checkpoints/latest.pt hf_out   # a transformers.CLIPModel
"""
import argparse
import json
import math
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from support.errors import UsageError, run_main
from support.pretrained import choose_activation, open_clip_fields, read_pretrained


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
        state_dict, fields = read_pretrained(path)
        cfg = CLIPConfig(**fields)
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


# ----------------------------------------------------------------------------- the export command


def main(argv=None):
    # Imported here: `import model` needs no data.py.
    from support.hf_export import check_export_target, export_hf
    parser = argparse.ArgumentParser(
        description="Write weights that CLIP.from_pretrained reads as a HF CLIPModel folder.",
        allow_abbrev=False)
    parser.add_argument("--export-hf", nargs=2, metavar=("CHECKPOINT", "OUT_DIR"), required=True)
    checkpoint, out_dir = parser.parse_args(argv).export_hf
    check_export_target(out_dir)  # before the weights are read: a wrong path fails at once
    export_hf(CLIP.from_pretrained(checkpoint), checkpoint, out_dir)


if __name__ == "__main__":
    run_main(main)
