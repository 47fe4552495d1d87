"""Our weights as a Hugging Face folder laid out as the hub's CLIP folders are: a
transformers.CLIPModel (the key map of support/pretrained.py, inverted), the run's tokenizer and
a preprocessor_config.json, so that CLIPProcessor gives the inputs our evaluate.py gives.
`python model.py --export-hf CKPT OUT_DIR` calls it."""
import os

import data
from support.errors import UsageError
from support.files import atomic_write, check_output, give_ordinary_modes
from support.pretrained import CLIP_MEAN, CLIP_STD, TRANSPOSED, hf_key_map, run_tokenizer_folder

# OpenCLIP's options that transformers' CLIPModel (OpenAI's network) has no place for.
NOT_IN_HF = ("vision_ls_init_value", "text_ls_init_value", "vision_pool_type", "text_pool_type",
             "vision_no_ln_pre", "text_proj_bias")


def check_export_target(out_dir):
    """Refuse an OUT_DIR that the export could not fill, before any weights are read: a file, a
    folder that holds files already (an export never mixes with other files), or a read-only one."""
    check_output(out_dir, "OUT_DIR", folder=True)
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise UsageError(f"OUT_DIR {out_dir}: exists and is not empty; pass a new or empty "
                         "folder.")


def check_fits_hf(cfg, checkpoint):
    """Refuse a model that transformers' CLIPModel cannot hold, naming the options that stop it."""
    defaults = type(cfg)()  # CLIPConfig's defaults: OpenAI's network
    options = [name for name in NOT_IN_HF if getattr(cfg, name) != getattr(defaults, name)]
    if options:
        raise UsageError(f"{checkpoint}: {', '.join(options)} set, which transformers' "
                         "CLIPModel cannot hold; keep this model in our format.")


def hf_tokenizer(folder, context_length):
    """The run's tokenizer, set up as HF users call it: tokenizer(texts, padding=True,
    truncation=True) gives the ids of data.tokenize, start- and end-of-text added, cut to the
    context, padded with the id our training padded with."""
    from tokenizers import processors
    tokenizer = data.load_tokenizer(folder)
    # data.tokenize pads with id 0, as OpenAI CLIP does; the hub's OpenCLIP folders name the
    # token of id 0 ("!" in CLIP's vocabulary) their pad token too. Positions after end-of-text
    # cannot change the features: the text tower is causal and pools at end-of-text.
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(0)
    tokenizer.model_max_length = context_length  # truncation=True cuts to the context
    # data.tokenize adds start- and end-of-text itself; a HF tokenizer adds them when called.
    bos = tokenizer.bos_token
    eos = tokenizer.eos_token
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        special_tokens=[(bos, tokenizer.bos_token_id), (eos, tokenizer.eos_token_id)])
    for key in ("local_files_only", "is_local"):  # how we read it, not what it is
        tokenizer.init_kwargs.pop(key, None)
    return tokenizer


def image_processor(cfg):
    """data.eval_transform as a CLIPImageProcessor: the shortest side resized to image_size
    (bicubic), the centre crop, pixels / 255, normalised with the statistics data.py trains with.
    Its PIL backend gives our pixels exactly; its default, torchvision, resizes with another
    bicubic kernel (up to 2 levels in 255 apart, measured in tests/test_pretrained.py)."""
    import transformers
    from PIL import Image
    return transformers.CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": cfg.image_size},
        resample=Image.Resampling.BICUBIC,
        do_center_crop=True, crop_size={"height": cfg.image_size, "width": cfg.image_size},
        do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))


def hf_clip_model(model, ids):
    """Our CLIP as a transformers.CLIPModel with the same weights; `ids`: the text config's
    bos_token_id, eos_token_id and pad_token_id."""
    import transformers
    cfg = model.config
    act = "quick_gelu" if cfg.quick_gelu else "gelu"
    # Each sub-config states the shared projection too, as the hub's CLIP configs do.
    vision = dict(hidden_size=cfg.vision_width, hidden_act=act,
                  intermediate_size=int(cfg.vision_width * cfg.vision_mlp_ratio),
                  num_hidden_layers=cfg.vision_layers,
                  num_attention_heads=cfg.vision_width // cfg.vision_head_width,
                  image_size=cfg.image_size, patch_size=cfg.patch_size,
                  projection_dim=cfg.embed_dim)
    text = dict(hidden_size=cfg.text_width, intermediate_size=4 * cfg.text_width,
                hidden_act=act, num_hidden_layers=cfg.text_layers,
                num_attention_heads=cfg.text_heads, vocab_size=cfg.vocab_size,
                max_position_embeddings=cfg.context_length, projection_dim=cfg.embed_dim, **ids)
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
    return hf_model


def export_hf(model, checkpoint, out_dir):
    """`model`, read by CLIP.from_pretrained from `checkpoint` -> a HF folder in `out_dir`: the
    CLIPModel, preprocessor_config.json and, where `checkpoint` is one of a run's, its tokenizer.
    Written whole or not at all (a temporary folder, renamed)."""
    check_export_target(out_dir)
    cfg = model.config
    check_fits_hf(cfg, checkpoint)
    # HF pools at the first eos_token_id: the run's tokenizer's (it may be smaller than the
    # vocabulary), else OpenAI's layout, end-of-text the last id. data.tokenize pads with 0.
    ids = dict(bos_token_id=cfg.vocab_size - 2, eos_token_id=cfg.vocab_size - 1, pad_token_id=0)
    tokenizer = None
    tokenizer_folder = run_tokenizer_folder(checkpoint)
    if tokenizer_folder:  # else transformers.AutoTokenizer finds a 2-token default there
        tokenizer = hf_tokenizer(tokenizer_folder, cfg.context_length)
        ids.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    hf_model = hf_clip_model(model, ids)

    def write(folder):
        hf_model.save_pretrained(folder)
        image_processor(cfg).save_pretrained(folder)
        if tokenizer:
            tokenizer.save_pretrained(folder)
        give_ordinary_modes(folder)  # safetensors writes 0600: others could not read the weights
    atomic_write(out_dir, write)
    print(f"wrote {os.path.abspath(out_dir)}")
