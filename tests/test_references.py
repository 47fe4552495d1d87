"""Independent references for the math that training and evaluation rest on.

Each test compares the project's code with a computation written out here from the definition
(or by hand), never with another branch of the same code: a loss that dropped a direction, a
schedule off by one step, a probe that ignored its validation loss would all fail here.
In-process and quick: no torchrun.
"""
import argparse
import math

import pytest
import torch
import torch.nn.functional as F

import data
import evaluate
import train
from model import CLIP, CLIPConfig

SMALL_CLIP = dict(embed_dim=16, image_size=16, patch_size=8, vision_width=32, vision_layers=2,
                  vision_head_width=16, context_length=12, vocab_size=64, text_width=32,
                  text_heads=2, text_layers=2)


# ----------------------------------------------------------------------------- the contrastive loss

def symmetric_info_nce(image_features, text_features, scale):
    """CLIP's loss from its definition, one sample at a time: for each image i, -log of the
    softmax probability of its own caption among all captions; the same for each caption; the
    mean of both."""
    n = image_features.shape[0]
    image_to_text = []
    text_to_image = []
    for i in range(n):
        scores_i = torch.stack([scale * image_features[i] @ text_features[j] for j in range(n)])
        image_to_text.append(-(scores_i[i] - torch.logsumexp(scores_i, 0)))
        scores_t = torch.stack([scale * text_features[i] @ image_features[j] for j in range(n)])
        text_to_image.append(-(scores_t[i] - torch.logsumexp(scores_t, 0)))
    return (torch.stack(image_to_text).mean() + torch.stack(text_to_image).mean()) / 2


def test_contrastive_loss_equals_the_symmetric_info_nce_written_out():
    torch.manual_seed(0)
    images = F.normalize(torch.randn(6, 5, dtype=torch.float64), dim=-1).requires_grad_()
    texts = F.normalize(torch.randn(6, 5, dtype=torch.float64), dim=-1).requires_grad_()
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    ours = train.contrastive_loss(images, texts, scale)
    reference = symmetric_info_nce(images, texts, scale)
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=0)
    ours_grads = torch.autograd.grad(ours, (images, texts, scale))
    reference_grads = torch.autograd.grad(reference, (images, texts, scale))
    for got, expected in zip(ours_grads, reference_grads):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-14)


def test_contrastive_loss_on_a_case_computed_by_hand():
    # Two pairs, scale 1. Scores s = images @ texts.T = [[1, 0.6], [0, 0.8]]: not symmetric, so
    # dropping either direction, or averaging over the wrong axis, changes the value.
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    texts = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=torch.float64)
    # image -> text, rows of s:     -log(e^1 / (e^1 + e^0.6)),  -log(e^0.8 / (e^0 + e^0.8))
    # text -> image, columns of s:  -log(e^1 / (e^1 + e^0)),    -log(e^0.8 / (e^0.6 + e^0.8))
    by_hand = (math.log(1 + math.exp(-0.4)) + math.log(1 + math.exp(-0.8))
               + math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(-0.2))) / 4
    loss = train.contrastive_loss(images, texts, torch.tensor(1.0, dtype=torch.float64))
    assert loss.item() == pytest.approx(by_hand, rel=1e-12)
    # On paper: (0.5130 + 0.3711 + 0.3133 + 0.5981) / 4 = 0.4489
    assert by_hand == pytest.approx(0.4489, abs=1e-4)


# ------------------------------------------------------------------------ schedule and optimizer

def test_cosine_lr_warms_up_linearly_then_decays_to_zero():
    base, warmup, total = 1e-3, 10, 110
    assert train.cosine_lr(0, base, warmup, total) == pytest.approx(base / warmup)
    assert train.cosine_lr(4, base, warmup, total) == pytest.approx(base * 5 / warmup)
    assert train.cosine_lr(warmup - 1, base, warmup, total) == pytest.approx(base)
    assert train.cosine_lr(warmup, base, warmup, total) == pytest.approx(base)  # the peak
    halfway = warmup + (total - warmup) // 2
    assert train.cosine_lr(halfway, base, warmup, total) == pytest.approx(base / 2)
    assert train.cosine_lr(total, base, warmup, total) == pytest.approx(0, abs=1e-15)
    after = [train.cosine_lr(s, base, warmup, total) for s in range(warmup, total)]
    assert all(a > b for a, b in zip(after, after[1:])) and after[-1] > 0
    assert train.cosine_lr(0, base, 0, total) == pytest.approx(base)  # no warm-up at all


def optimizer_flags(**overrides):
    return argparse.Namespace(**{"lr": 1e-3, "wd": 0.2, "beta1": 0.9, "beta2": 0.98,
                                 "eps": 1e-6, "grad_clip_norm": None, **overrides})


def test_weight_decay_spares_gains_biases_and_logit_scale():
    """As OpenCLIP: nothing with fewer than two dimensions decays (gains, biases, logit_scale)."""
    model = CLIP(CLIPConfig(**SMALL_CLIP))
    optimizer = train.make_optimizer(model, optimizer_flags())
    decay_of = {id(p): group["weight_decay"] for group in optimizer.param_groups
                for p in group["params"]}
    assert len(decay_of) == len(list(model.parameters()))  # every parameter, once
    for name, parameter in model.named_parameters():
        expected = 0.2 if parameter.ndim >= 2 else 0.0
        assert decay_of[id(parameter)] == expected, name
    names_without_decay = {n for n, p in model.named_parameters() if decay_of[id(p)] == 0}
    assert "logit_scale" in names_without_decay
    assert any(n.endswith(".bias") for n in names_without_decay)
    assert any("ln" in n and n.endswith(".weight") for n in names_without_decay)


def test_grad_clip_norm_bounds_the_update_of_a_plain_step():
    torch.manual_seed(0)
    model = CLIP(CLIPConfig(**SMALL_CLIP))
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 10
    raw_norm = torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()
    assert raw_norm > 1.0
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # update = -gradient, to read it back
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n != "logit_scale"}
    train.optimizer_step(model, optimizer, optimizer_flags(grad_clip_norm=1.0))
    moved = torch.cat([(before[n] - p.detach()).flatten()
                       for n, p in model.named_parameters() if n != "logit_scale"])
    assert moved.norm().item() <= 1.0 + 1e-5
    assert moved.norm().item() > 0.5  # clipped to the bound, not zeroed


def test_grad_checkpointing_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    model = CLIP(CLIPConfig(**SMALL_CLIP)).train()
    images = torch.randn(4, 3, 16, 16)
    tokens = torch.randint(1, 63, (4, 12))
    tokens[:, -1] = 63
    results = []
    for checkpointing in (False, True):
        model.zero_grad(set_to_none=True)
        model.set_grad_checkpointing(checkpointing)
        image_features, text_features, scale = model(images, tokens)
        loss = train.contrastive_loss(image_features, text_features, scale)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=0)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("flags, expected", [("fpu avx2 avx512f", "fp32"),
                                             ("fpu avx2 avx512f avx512_bf16", "bf16"),
                                             ("fpu amx_bf16 amx_tile", "bf16")])
def test_default_precision_is_bf16_only_where_the_cpu_multiplies_bf16(monkeypatch, flags, expected):
    if torch.cuda.is_available():
        pytest.skip("the CPU rule; a GPU machine decides by torch.cuda.is_bf16_supported")
    real_open = open

    def fake_open(path, *args, **kwargs):
        if path == "/proc/cpuinfo":
            import io
            return io.StringIO(f"processor\t: 0\nflags\t\t: {flags}\n")
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr("builtins.open", fake_open)
    monkeypatch.setattr("os.path.exists", lambda path: True)
    assert train.default_precision(torch.device("cpu")) == expected


# ----------------------------------------------------------------------------- zero-shot

QUILT_TEMPLATES = ["a histopathology slide showing {}.", "histopathology image of {}.",
                   "pathology tissue showing {}.", "presence of {} tissue on image."]


@pytest.fixture(scope="module")
def small_model_and_tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer") / "bpe"
    captions = ["benign lung", "lung adenocarcinoma", "a histopathology slide showing tissue.",
                "pathology tissue showing cells", "presence of tumor tissue on image."]
    data.train_tokenizer(captions * 4, str(folder), 200)
    tokenizer = data.load_tokenizer(str(folder))
    torch.manual_seed(0)
    model = CLIP(CLIPConfig(**{**SMALL_CLIP, "vocab_size": len(tokenizer)})).eval()
    return model, tokenizer


def test_zero_shot_uses_the_quilt_templates_and_matches_a_computation_by_hand(
        small_model_and_tokenizer):
    model, tokenizer = small_model_and_tokenizer
    assert evaluate.TEMPLATES == QUILT_TEMPLATES
    classnames = ["benign lung", "lung adenocarcinoma", "lung squamous cell carcinoma"]
    classifier = evaluate.zero_shot_classifier(model, tokenizer, classnames, torch.device("cpu"))
    by_hand = []
    with torch.no_grad():
        for name in classnames:  # one prompt at a time, mean of the unit vectors, renormalised
            vectors = []
            for template in QUILT_TEMPLATES:
                tokens = data.tokenize(tokenizer, [template.format(name)], 12)
                vectors.append(F.normalize(model.encode_text(tokens)[0], dim=-1))
            by_hand.append(F.normalize(torch.stack(vectors).mean(0), dim=-1))
    by_hand = torch.stack(by_hand, dim=1)                                   # (D, C)
    torch.testing.assert_close(classifier, by_hand, rtol=1e-5, atol=1e-6)
    torch.manual_seed(1)
    features = F.normalize(torch.randn(30, by_hand.shape[0]), dim=-1)
    labels = (features @ by_hand).argmax(1)  # features whose nearest class is known
    labels[:5] = (labels[:5] + 1) % 3        # and five that the classifier must get wrong
    metrics = evaluate.zero_shot(model, tokenizer, classnames, features, labels,
                                 torch.device("cpu"))
    assert metrics["accuracy"] == pytest.approx(25 / 30)


# ----------------------------------------------------------------------------- the linear probe

def two_clusters(n, seed, separation):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    features = torch.randn(n, 4, generator=generator)
    features[:, 0] += separation * (2 * labels - 1)
    return features, labels


def probe_on_clusters(sizes, first_seed, separation):
    """(train, valid, test) splits of two_clusters, and linear_probe's result on them."""
    splits = [two_clusters(n, first_seed + i, separation) for i, n in enumerate(sizes)]
    return splits, evaluate.linear_probe(*splits, 2, refit=False, device=torch.device("cpu"))


def test_linear_probe_separable_features_need_the_weakest_l2_and_score_perfectly():
    _, result = probe_on_clusters((60, 20, 40), 0, separation=6.0)
    assert result["accuracy"] == 1.0
    assert result["weight_decay"] == min(evaluate.WEIGHT_DECAYS)


def test_linear_probe_on_noise_picks_the_strongest_l2_by_validation_loss():
    generator = torch.Generator().manual_seed(0)
    splits = [(torch.randn(n, 8, generator=generator), torch.arange(n) % 2) for n in (40, 40, 40)]
    result = evaluate.linear_probe(*splits, 2, refit=False, device=torch.device("cpu"))
    assert result["weight_decay"] == max(evaluate.WEIGHT_DECAYS)


def test_linear_probe_picks_the_strength_with_the_lowest_validation_loss_recomputed_here():
    (train_split, valid_split, _), result = probe_on_clusters((40, 40, 40), 3, separation=1.0)
    recomputed = {}
    for strength in evaluate.WEIGHT_DECAYS:
        weight, bias = evaluate.fit_logistic_regression(*train_split, 2, strength)
        logits = valid_split[0].double() @ weight + bias
        recomputed[strength] = F.cross_entropy(logits, valid_split[1]).item()
    for strength, loss in recomputed.items():
        assert result["validation_cross_entropy"][str(strength)] == pytest.approx(loss, rel=1e-9)
    assert result["weight_decay"] == min(recomputed, key=recomputed.get)
    assert len(set(round(v, 6) for v in recomputed.values())) > 1  # a real choice was made


# ----------------------------------------------------------------------------- the feature cache

class FakeDataset:
    def __init__(self, fingerprint):
        self.fingerprint = fingerprint
        self.labels = torch.tensor([0, 1, 0])


def test_feature_cache_is_invalidated_by_other_weights_or_another_dataset(tmp_path, monkeypatch):
    encoded = []

    def fake_encode(model, dataset, device, batch_size, workers):
        encoded.append((model, dataset.fingerprint))
        return torch.full((3, 2), float(len(encoded))), dataset.labels
    monkeypatch.setattr(evaluate, "encode_images", fake_encode)
    cpu = torch.device("cpu")

    def features(weights_sha, dataset_fingerprint):
        dataset = FakeDataset(dataset_fingerprint)
        return evaluate.cached_features("model", dataset, cpu, weights_sha, str(tmp_path), 8, 0)[0]
    first = features("a" * 64, "d" * 64)
    assert torch.equal(features("a" * 64, "d" * 64), first) and len(encoded) == 1  # reused
    assert not torch.equal(features("b" * 64, "d" * 64), first) and len(encoded) == 2  # weights
    assert not torch.equal(features("a" * 64, "e" * 64), first) and len(encoded) == 3  # dataset
