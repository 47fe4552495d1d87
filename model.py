"""CLIP in plain PyTorch: a Vision Transformer and a text Transformer trained to agree.

This file holds only the network. Parameter names follow OpenAI CLIP / OpenCLIP exactly
(`visual.conv1`, `transformer.resblocks.0.attn.in_proj_weight`, `ln_final`, ...) so that published
checkpoints load with a short, explicit key map (see `CLIP.from_pretrained`).

    python -c "import model; print(model.CLIP(model.model_config('tiny')))"
"""
import json
import math
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


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
    quick_gelu: bool = False      # OpenAI's weights were trained with QuickGELU; match it when loading them


PRESETS = {
    # The published sizes (OpenAI CLIP; QuiltNet-B-32 is ViT-B-32 with quick_gelu).
    "ViT-B-32": CLIPConfig(),
    "ViT-B-16": CLIPConfig(patch_size=16),
    # A CPU-sized model for the demo and the tests: 64 px images, 8 px patches, 4+4 layers.
    # vocab_size is replaced by the size of the tokenizer trained on the captions (see data.py).
    "tiny": CLIPConfig(embed_dim=128, image_size=64, patch_size=8, vision_width=128, vision_layers=4,
                       vision_head_width=32, context_length=32, vocab_size=1024, text_width=128,
                       text_heads=4, text_layers=4),
}


def model_config(name_or_path):
    """A preset name, or a JSON file in OpenCLIP's model-config layout."""
    if name_or_path in PRESETS:
        return CLIPConfig(**asdict(PRESETS[name_or_path]))
    if not os.path.isfile(name_or_path):
        raise SystemExit(f"--model {name_or_path}: not a preset ({', '.join(PRESETS)}) nor a JSON file.")
    with open(name_or_path) as f:
        cfg = json.load(f)
    try:
        vision, text = cfg["vision_cfg"], cfg["text_cfg"]
        return CLIPConfig(
            embed_dim=cfg["embed_dim"], image_size=vision["image_size"], patch_size=vision["patch_size"],
            vision_width=vision["width"], vision_layers=vision["layers"],
            vision_head_width=vision.get("head_width", 64), context_length=text.get("context_length", 77),
            vocab_size=text.get("vocab_size", 49408), text_width=text["width"], text_heads=text["heads"],
            text_layers=text["layers"], quick_gelu=cfg.get("quick_gelu", False))
    except (KeyError, TypeError) as e:
        raise SystemExit(f"--model {name_or_path}: missing key {e} (expected OpenCLIP's layout: embed_dim, "
                         "vision_cfg{image_size,patch_size,width,layers}, text_cfg{width,heads,layers}).")


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI CLIP was trained with."""
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention with one fused q/k/v projection.

    The parameter names are those of nn.MultiheadAttention (in_proj_weight, out_proj), which OpenAI
    CLIP used, but the computation goes through F.scaled_dot_product_attention: flash or memory-
    efficient kernels on GPU, and no Python loop over heads anywhere.
    """
    def __init__(self, width, heads):
        super().__init__()
        assert width % heads == 0, f"width {width} is not divisible by {heads} heads"
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x, is_causal):
        B, L, D = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        # (B, L, D) -> (B, heads, L, head_width)
        q, k, v = (t.view(B, L, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
        x = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
        return self.out_proj(x.transpose(1, 2).reshape(B, L, D))


class ResidualAttentionBlock(nn.Module):
    """Pre-LayerNorm Transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""
    def __init__(self, width, heads, quick_gelu):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, 4 * width)),
            ("gelu", QuickGELU() if quick_gelu else nn.GELU()),
            ("c_proj", nn.Linear(4 * width, width)),
        ]))

    def forward(self, x, is_causal=False):
        x = x + self.attn(self.ln_1(x), is_causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, quick_gelu, is_causal):
        super().__init__()
        self.width, self.layers, self.is_causal = width, layers, is_causal
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, quick_gelu) for _ in range(layers))
        self.grad_checkpointing = False  # recompute activations in backward: less memory, ~30% more compute

    def forward(self, x):  # (B, L, width) -> (B, L, width)
        for block in self.resblocks:
            if self.grad_checkpointing and self.training:
                x = checkpoint(block, x, self.is_causal, use_reentrant=False)
            else:
                x = block(x, self.is_causal)
        return x


class VisionTransformer(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        width, grid = cfg.vision_width, cfg.image_size // cfg.patch_size
        scale = width ** -0.5
        # A convolution with stride = kernel = patch size cuts the image into patches and embeds each one.
        self.conv1 = nn.Conv2d(3, width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, cfg.vision_layers, width // cfg.vision_head_width,
                                       cfg.quick_gelu, is_causal=False)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, cfg.embed_dim))

    def forward(self, images):                                 # (B, 3, H, W)
        x = self.conv1(images)                                 # (B, width, grid, grid)
        x = x.flatten(2).transpose(1, 2)                       # (B, grid*grid, width)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (B, 1 + grid*grid, width)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj               # class token -> (B, embed_dim)


class CLIP(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.config = cfg
        self.visual = VisionTransformer(cfg)
        # The text encoder lives at the top level, with OpenAI's names.
        self.transformer = Transformer(cfg.text_width, cfg.text_layers, cfg.text_heads, cfg.quick_gelu,
                                       is_causal=True)  # a token sees only the tokens before it
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.text_width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.text_width))
        self.ln_final = nn.LayerNorm(cfg.text_width)
        self.text_projection = nn.Parameter(torch.empty(cfg.text_width, cfg.embed_dim))
        # A learned temperature, kept in log space: logits = exp(logit_scale) * cosine similarity.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.init_parameters()

    def init_parameters(self):
        """OpenAI CLIP's initialisation (clip/model.py, build-from-scratch path)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        for tower in (self.visual.transformer, self.transformer):
            proj_std = (tower.width ** -0.5) * ((2 * tower.layers) ** -0.5)
            attn_std, fc_std = tower.width ** -0.5, (2 * tower.width) ** -0.5
            for block in tower.resblocks:
                nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
                nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
                nn.init.zeros_(block.attn.out_proj.bias)
                nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
                nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=self.transformer.width ** -0.5)

    def set_grad_checkpointing(self, enable=True):
        self.visual.transformer.grad_checkpointing = enable
        self.transformer.grad_checkpointing = enable

    def encode_image(self, images):
        """(B, 3, H, W) normalised pixels -> (B, embed_dim) projected, unnormalised features."""
        return self.visual(images)

    def encode_text(self, tokens):
        """(B, context_length) token ids -> (B, embed_dim) projected, unnormalised features."""
        x = self.token_embedding(tokens) + self.positional_embedding.to(self.token_embedding.weight.dtype)
        x = self.ln_final(self.transformer(x))                 # (B, context_length, text_width)
        # Pool at the end-of-text token: with causal attention it is the first position that has seen
        # the whole caption. The tokenizers used here give end-of-text the largest id (49407 in CLIP's
        # vocabulary; data.py appends it last to the vocabulary it trains), so argmax finds it.
        eot = tokens.argmax(dim=-1)
        return x[torch.arange(x.shape[0], device=x.device), eot] @ self.text_projection

    def forward(self, images, tokens):
        """What the contrastive loss needs: L2-normalised features of both towers and exp(logit_scale)."""
        image_features = F.normalize(self.encode_image(images), dim=-1)
        text_features = F.normalize(self.encode_text(tokens), dim=-1)
        return image_features, text_features, self.logit_scale.exp()

    @torch.no_grad()
    def clamp_logit_scale(self):
        """CLIP's paper clips the temperature so logits are scaled by at most 100, in log space."""
        self.logit_scale.clamp_(0, math.log(100))

    @classmethod
    def from_pretrained(cls, path):
        """Our own checkpoint (a run's checkpoints/*.pt) -> CLIP in eval mode, on the CPU."""
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle code
        model = cls(CLIPConfig(**checkpoint["config"]))
        model.load_state_dict(checkpoint["model"])
        return model.eval()
