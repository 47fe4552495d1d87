"""model.py: shapes, where the text encoder pools, the causal mask, the temperature clamp,
configs."""
import json
import math

import pytest
import torch

import data
from model import CLIP, Attention, model_config
from support.errors import UsageError


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return CLIP(model_config("tiny")).eval()


def test_shapes_and_normalised_outputs(tiny):
    images, tokens = torch.randn(3, 3, 64, 64), torch.randint(1, 1000, (3, 32))
    tokens[:, 10] = 1023  # end-of-text
    assert tiny.encode_image(images).shape == (3, 128)
    assert tiny.encode_text(tokens).shape == (3, 128)
    image_features, text_features, scale = tiny(images, tokens)
    torch.testing.assert_close(image_features.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(text_features.norm(dim=-1), torch.ones(3))
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-5)


def test_text_is_pooled_at_the_first_end_of_text_token(tiny):
    eot = tiny.config.vocab_size - 1
    a = torch.randint(1, 500, (1, 32))
    a[0, 5] = eot
    b = a.clone()
    b[0, 6:] = torch.randint(1, 500, (26,))  # anything after the end-of-text token changes nothing
    b[0, 20] = eot                            # not even a second end-of-text
    with torch.no_grad():
        torch.testing.assert_close(tiny.encode_text(a), tiny.encode_text(b))
        c = a.clone()
        c[0, 2] += 1                          # a token before it does change the result
        assert not torch.allclose(tiny.encode_text(a), tiny.encode_text(c))


def test_text_attention_is_causal_and_image_attention_is_not(tiny):
    with torch.no_grad():
        x = torch.randn(1, 32, 128)
        y = x.clone()
        y[0, 20:] += 1  # change the future
        out_x, out_y = tiny.transformer(x), tiny.transformer(y)
        torch.testing.assert_close(out_x[0, :20], out_y[0, :20])  # the past cannot see it
        assert not torch.allclose(out_x[0, 20:], out_y[0, 20:])
        v = torch.randn(1, 65, 128)
        w = v.clone()
        w[0, 64] += 1
        vision = tiny.visual.transformer
        assert not torch.allclose(vision(v)[0, 0], vision(w)[0, 0])


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("is_causal", [False, True], ids=["vision", "text"])
def test_written_out_cpu_bf16_attention_matches_the_fused_kernel(is_causal):
    torch.manual_seed(0)
    attention = Attention(64, 4)
    torch.nn.init.normal_(attention.in_proj_weight, std=0.2)  # peaked attention: the mask matters
    x = torch.randn(2, 12, 64, requires_grad=True)
    reference = attention(x, is_causal)  # fp32: F.scaled_dot_product_attention
    reference_grad, = torch.autograd.grad(reference.square().sum(), x)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the written-out path
        written_out = attention(x, is_causal)
    grad, = torch.autograd.grad(written_out.float().square().sum(), x)
    # Measured: 0.6-1.3% (bf16 keeps 8 bits); the other mask (causal <-> not) is off by ~90%.
    assert relative(written_out.float(), reference) < 0.02
    assert relative(grad, reference_grad) < 0.02
    assert relative(attention(x, not is_causal), reference) > 0.5


def test_logit_scale_is_clamped_at_ln_100(tiny):
    with torch.no_grad():
        tiny.logit_scale.fill_(10.0)
    tiny.clamp_logit_scale()
    assert tiny.logit_scale.item() == pytest.approx(math.log(100))
    assert tiny.logit_scale.exp().item() == pytest.approx(100, rel=1e-5)


def test_published_presets_have_the_published_sizes():
    counts = {}
    for name in ("ViT-B-32", "ViT-B-16"):
        # On the meta device a parameter has a shape and no storage: counting needs no memory
        # and no initialisation.
        with torch.device("meta"):
            model = CLIP(model_config(name))
        counts[name] = sum(p.numel() for p in model.parameters())
    # OpenAI CLIP's parameter counts
    assert counts == {"ViT-B-32": 151_277_313, "ViT-B-16": 149_620_737}


def test_openclip_model_config_json_is_accepted(tmp_path):
    path = tmp_path / "my-vit.json"
    vision_cfg = {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32}
    text_cfg = {"context_length": 16, "vocab_size": 100, "width": 64, "heads": 2, "layers": 2}
    path.write_text(json.dumps({"embed_dim": 64, "quick_gelu": True,
                                "vision_cfg": vision_cfg, "text_cfg": text_cfg}))
    cfg = model_config(str(path))
    assert (cfg.image_size, cfg.vision_layers, cfg.text_heads, cfg.quick_gelu) == (32, 2, 2, True)
    model = CLIP(cfg)
    assert model.encode_image(torch.randn(2, 3, 32, 32)).shape == (2, 64)
    with pytest.raises(UsageError, match="not a preset"):
        model_config(str(tmp_path / "missing.json"))


def test_our_tokenizer_ends_with_the_largest_id_and_pads_with_zero(tmp_path):
    captions = ["benign colonic tissue", "colon adenocarcinoma with crowded glands"]
    data.train_tokenizer(captions * 5, tmp_path, 300)
    tokenizer = data.load_tokenizer(str(tmp_path))
    tokens = data.tokenize(tokenizer, ["benign colonic tissue", "x " * 100], context_length=16)
    eot = len(tokenizer) - 1
    assert tokens[0, 0] == tokenizer.bos_token_id
    assert (tokens[0] == eot).sum() == 1 and tokens[0, -1] == 0
    assert tokens[1, -1] == eot  # truncated captions still end with end-of-text
    assert tokens.argmax(dim=-1).tolist() == [(tokens[0] == eot).nonzero().item(), 15]
