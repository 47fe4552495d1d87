"""The distributed contrastive loss against the symmetric InfoNCE of one process on the
concatenated batch (written out in test_references.py, independent of train.py), against
OpenCLIP's ClipLoss semantics in all four flag combinations, and train_step's accumulation with
DDP's tree hook against one process (the same bits, RULE 3) and one step on the whole batch;
plain DDP where no bits are promised, all-reducing once per step.

Real gloo process groups (world sizes 2 and 3) on the CPU, float64, DDP-style gradient averaging.
This is the gradient table in train.contrastive_loss's docstring, proved.
"""
import itertools

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

import train
from conftest import relative_difference
from test_references import symmetric_info_nce

BATCH, IN_DIM, EMBED = 4, 6, 5


def make_problem(world):
    """A tiny two-tower 'encoder' and the full batch of inputs, identical in every process."""
    torch.manual_seed(0)
    encoder = {"image": torch.randn(IN_DIM, EMBED, dtype=torch.float64),
               "text": torch.randn(IN_DIM, EMBED, dtype=torch.float64),
               "log_scale": torch.tensor(2.0, dtype=torch.float64)}
    images = torch.randn(world * BATCH, IN_DIM, dtype=torch.float64)
    texts = torch.randn(world * BATCH, IN_DIM, dtype=torch.float64)
    return encoder, (images, texts)


def loss_and_grads(encoder, images, texts, loss_function=train.contrastive_loss, **flags):
    params = {k: v.clone().requires_grad_() for k, v in encoder.items()}
    image_features = torch.nn.functional.normalize(images @ params["image"], dim=-1)
    text_features = torch.nn.functional.normalize(texts @ params["text"], dim=-1)
    loss = loss_function(image_features, text_features, params["log_scale"].exp(), **flags)
    loss.backward()
    return loss.detach(), {k: p.grad for k, p in params.items()}


def openclip_clip_loss(image_features, text_features, scale, local_loss, gather_with_grad):
    """OpenCLIP 3.3's gather_features + ClipLoss, restated from its source: the gathered copies
    carry no gradient unless gathered with grad, and the rank's own features are put back into
    them only for the global loss."""
    rank = dist.get_rank()
    if gather_with_grad:
        all_image = torch.cat(torch.distributed.nn.all_gather(image_features))
        all_text = torch.cat(torch.distributed.nn.all_gather(text_features))
    else:
        images = [torch.zeros_like(image_features) for _ in range(dist.get_world_size())]
        texts = [torch.zeros_like(text_features) for _ in range(dist.get_world_size())]
        dist.all_gather(images, image_features)
        dist.all_gather(texts, text_features)
        if not local_loss:
            images[rank] = image_features
            texts[rank] = text_features
        all_image = torch.cat(images)
        all_text = torch.cat(texts)
    if local_loss:
        per_image = scale * image_features @ all_text.T
        per_text = scale * text_features @ all_image.T
        labels = torch.arange(len(image_features)) + rank * len(image_features)
    else:
        per_image = scale * all_image @ all_text.T
        per_text = per_image.T
        labels = torch.arange(len(all_image))
    return (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2


def ddp_average(loss, grads, world):
    for tensor in [loss, *grads.values()]:  # what DDP does: average over ranks
        dist.all_reduce(tensor)
        tensor /= world
    return loss, grads


def worker(rank, world, rendezvous, results):
    """Everything this file needs of `world` processes, started once per world size."""
    torch.set_num_threads(1)  # the thread count is part of the bits (accumulated_gradients)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    encoder, (images, texts) = make_problem(world)
    mine = slice(rank * BATCH, (rank + 1) * BATCH)
    out = {}
    for local_loss, gather_with_grad in itertools.product([False, True], repeat=2):
        flags = {"local_loss": local_loss, "gather_with_grad": gather_with_grad}
        ours = loss_and_grads(encoder, images[mine], texts[mine], **flags)
        out[(local_loss, gather_with_grad)] = ddp_average(*ours, world)
        theirs = loss_and_grads(encoder, images[mine], texts[mine], openclip_clip_loss, **flags)
        out[("openclip", local_loss, gather_with_grad)] = ddp_average(*theirs, world)
    out["non_contiguous"] = [None] * world  # every rank's gradients
    dist.all_gather_object(out["non_contiguous"], non_contiguous_gradients(rank))
    if world == 2:  # the tree needs a power-of-two number of processes
        out["accumulated"] = accumulated_gradients(rank, world)
        out["plain ddp"] = plain_ddp_gradients(rank, world)
        out["tree hook"] = {flags: tree_hook_registered(flags, world) for flags in HOOK_FLAGS}
    if rank == 0:
        torch.save(out, results)
    dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 3])
def distributed(request, tmp_path_factory):
    world, folder = request.param, tmp_path_factory.mktemp(f"world{request.param}")
    worker_args = (world, str(folder / "rendezvous"), str(folder / "results.pt"))
    # Forked, not spawned: the children share this process's imports (seconds each). They keep
    # to one thread, and to the CPU, the two things a fork does not carry over.
    mp.start_processes(worker, args=worker_args, nprocs=world, start_method="fork")
    encoder, (images, texts) = make_problem(world)
    # One process, the whole batch, the loss as defined (not train.py's single-process branch).
    reference = loss_and_grads(encoder, images, texts, symmetric_info_nce)
    return world, reference, torch.load(folder / "results.pt", weights_only=True)


def assert_close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("local_loss", [False, True])
def test_gather_with_grad_gives_the_single_process_gradient(distributed, local_loss):
    world, (ref_loss, ref_grads), results = distributed
    loss, grads = results[(local_loss, True)]
    assert_close(loss, ref_loss)
    for name in ref_grads:
        assert_close(grads[name], ref_grads[name])


def test_global_loss_without_gather_with_grad_scales_encoder_gradients_by_one_over_world(
        distributed):
    world, (ref_loss, ref_grads), results = distributed
    loss, grads = results[(False, False)]
    assert_close(loss, ref_loss)
    assert_close(grads["image"], ref_grads["image"] / world)
    assert_close(grads["text"], ref_grads["text"] / world)
    assert_close(grads["log_scale"], ref_grads["log_scale"])  # every rank sees the whole loss


def test_local_loss_without_gather_with_grad_is_biased(distributed):
    world, (ref_loss, ref_grads), results = distributed
    loss, grads = results[(True, False)]
    assert_close(loss, ref_loss)  # the value is right...
    for name in ("image", "text"):  # ...but the gradient is not a multiple of the true one
        g, ref = grads[name].flatten(), ref_grads[name].flatten()
        best_scale = (g @ ref) / (ref @ ref)
        assert (g - best_scale * ref).norm() > 1e-3 * g.norm(), \
            f"{name} gradient is proportional to the truth"


@pytest.mark.parametrize("local_loss, gather_with_grad",
                         list(itertools.product([False, True], repeat=2)))
def test_each_flag_combination_means_what_openclip_means(distributed, local_loss,
                                                         gather_with_grad):
    world, _, results = distributed
    loss, grads = results[(local_loss, gather_with_grad)]
    openclip_loss, openclip_grads = results[("openclip", local_loss, gather_with_grad)]
    assert_close(loss, openclip_loss)
    for name in openclip_grads:
        assert_close(grads[name], openclip_grads[name])


def non_contiguous_gradients(rank):
    """x's gradient through a transposed use of the gathered tensor, which hands backward a
    non-contiguous gradient, on both backward paths: an all-reduce (each rank's own loss) and
    N x our slice (one loss on every rank)."""
    gradients = []
    for same_loss_on_every_rank in (False, True):
        x = torch.full((3, 4), float(rank + 1), requires_grad=True)
        gathered = train.GatherWithGrad.apply(x, same_loss_on_every_rank)  # (world * 3, 4)
        weights = torch.arange(4.0 * len(gathered)).view(4, -1)
        (gathered.T * weights).sum().backward()  # gathered's gradient is weights.T: strided
        gradients.append(x.grad)
    return gradients


def test_gather_with_grad_accepts_non_contiguous_gradients(distributed):
    world, _, results = distributed
    weights = torch.arange(4.0 * 3 * world).view(4, -1)
    for rank, gradients in enumerate(results["non_contiguous"]):
        for gradient in gradients:
            # d/dx of the sum over the ranks' identical losses = world x our slice of weights.T
            torch.testing.assert_close(gradient, world * weights.T[rank * 3:(rank + 1) * 3])


SMALL_CLIP = dict(embed_dim=32, image_size=32, patch_size=8, vision_width=64, vision_layers=2,
                  vision_head_width=32, context_length=12, vocab_size=100, text_width=64,
                  text_heads=2, text_layers=2)


def clip_and_batch(samples):
    """The same small CLIP and the same `samples` image-caption pairs in every process."""
    from model import CLIP, CLIPConfig
    torch.manual_seed(0)
    model = CLIP(CLIPConfig(**SMALL_CLIP)).train()
    images = torch.randn(samples, 3, 32, 32)
    tokens = torch.randint(1, 99, (samples, 12))
    tokens[:, -1] = 99  # end-of-text, the largest id
    return model, images, tokens


def step_gradients(model, micro_batches, precision, flags=()):
    """train.py's step on the CPU, fp32 or under bf16 autocast: the gradients by name. `flags`:
    those the model was distributed with."""
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    train.train_step(model, micro_batches, train.parse_args(list(flags)), autocast)
    gradients = {name.removeprefix("module."): p.grad.clone()
                 for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return gradients


def micro_batches_of(images, tokens, size):
    return [(images[i:i + size], tokens[i:i + size]) for i in range(0, len(images), size)]


def accumulated_gradients(rank, world):
    """train_step under DDP with RULE 3's hook, as train.py: rank r takes micro-batches 2r and
    2r + 1 of 4 pairs each, as data.GlobalBatchSampler; fp32 and bf16."""
    model, images, tokens = clip_and_batch(16)
    ddp = train.distribute(model, train.parse_args(["--accum-steps", "2"]), world)
    mine = slice(rank * 8, (rank + 1) * 8)
    micro_batches = micro_batches_of(images[mine], tokens[mine], 4)
    return {precision: step_gradients(ddp, micro_batches, precision)
            for precision in ("fp32", "bf16")}


def plain_ddp_gradients(rank, world):
    """train_step under --reduction ddp with --accum-steps 2, as accumulated_gradients: fp32
    gradients, and the buckets DDP's all-reduce (a counting copy of it) was called for."""
    model, images, tokens = clip_and_batch(16)
    flags = ["--accum-steps", "2", "--reduction", "ddp"]
    ddp = train.distribute(model, train.parse_args(flags), world)
    reduced = []

    def counted_all_reduce(state, bucket):
        reduced.append(bucket.index())
        return default_hooks.allreduce_hook(None, bucket)

    ddp.register_comm_hook(None, counted_all_reduce)  # none was: no tree under --reduction ddp
    mine = slice(rank * 8, (rank + 1) * 8)
    micro_batches = micro_batches_of(images[mine], tokens[mine], 4)
    gradients = step_gradients(ddp, micro_batches, "fp32", flags)
    return gradients, reduced


HOOK_FLAGS = [(), ("--reduction", "ddp"), ("--local-loss",), ("--accum-steps", "3"),
              ("--no-gather-with-grad",), ("--accum-steps", "2")]


def tree_hook_registered(flags, world):
    """Whether train.distribute gave DDP the tree hook under `flags`."""
    model, _, _ = clip_and_batch(0)
    return bool(train.distribute(model, train.parse_args(list(flags)), world)._comm_hooks)


def test_ddp_gets_the_tree_hook_only_where_the_guarantee_is_bitwise(distributed):
    world, _, results = distributed
    if "tree hook" not in results:
        pytest.skip("the tree needs a power-of-two number of processes")
    for flags, registered in results["tree hook"].items():
        level = train.world_size_guarantee(train.parse_args(list(flags)), world)["level"]
        assert registered == (level == "bitwise"), flags
    assert results["tree hook"][()] and not results["tree hook"][("--reduction", "ddp")]


def test_plain_ddp_all_reduces_once_per_step_and_sums_the_micro_batches(distributed):
    """--reduction ddp, 2 ranks x 2 micro-batches: no_sync for the first, so each bucket is
    all-reduced once; the gradients those of 1 process x 4 micro-batches up to float rounding."""
    world, _, results = distributed
    if "plain ddp" not in results:
        pytest.skip("run at world size 2")
    gradients, reduced = results["plain ddp"]
    assert reduced and len(reduced) == len(set(reduced))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, images, tokens = clip_and_batch(16)
        one_process = step_gradients(model, micro_batches_of(images, tokens, 4), "fp32")
    finally:
        torch.set_num_threads(threads)
    assert relative_difference(gradients, one_process) < 1e-5


def test_the_tree_hook_under_pythons_reducer_is_refused_in_one_line():
    """Compiled autograd's DDP calls a hook per parameter; refused before DDP is built."""
    from support.errors import UsageError
    model, _, _ = clip_and_batch(0)
    with torch._dynamo.config.patch(optimize_ddp="python_reducer"):
        with pytest.raises(UsageError, match="python_reducer"):
            train.distribute(model, train.parse_args([]), 2)


def test_accumulation_with_ddp_gives_the_bits_of_one_process_and_the_whole_batch_gradient(
        distributed):
    """2 ranks x 2 micro-batches of 4 (no-grad caching pass, DDP's tree hook, backward outside
    autocast) against 1 process x 4 micro-batches of 4: the same bits, fp32 and bf16 (RULE 3);
    and against one process on all 16 pairs at once in bf16: equal up to bf16's rounding."""
    world, _, results = distributed
    if "accumulated" not in results:
        pytest.skip("the tree needs a power-of-two number of processes")
    accumulated = results["accumulated"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, images, tokens = clip_and_batch(16)
        for precision in ("fp32", "bf16"):
            one_process = step_gradients(model, micro_batches_of(images, tokens, 4), precision)
            for name, gradient in one_process.items():
                assert torch.equal(accumulated[precision][name], gradient), f"{precision} {name}"
        whole = step_gradients(model, [(images, tokens)], "bf16")
        half = step_gradients(model, [(images[:8], tokens[:8])], "bf16")  # a wrong accumulation
    finally:
        torch.set_num_threads(threads)
    accumulated = accumulated["bf16"]
    # Measured 1e-3 over all, 0 for logit_scale (it takes part in both micro-batches, at 1/2
    # each: without that 1/2 it is 1.0 away); a gradient of half the batch is 0.55 away.
    assert relative_difference(accumulated, whole) < 1e-2
    assert relative_difference(accumulated, whole, ["logit_scale"]) < 1e-2
    assert relative_difference(half, whole) > 0.2
