"""Our weights as a Hugging Face transformers.CLIPModel folder: the key map of
support/pretrained.py, inverted. `python model.py --export-hf CKPT OUT_DIR` calls it."""
import shutil

import data
from support.errors import UsageError
from support.pretrained import TRANSPOSED, hf_key_map, run_tokenizer_folder

# OpenCLIP's options that transformers' CLIPModel (OpenAI's network) has no place for.
NOT_IN_HF = ("vision_ls_init_value", "text_ls_init_value", "vision_pool_type", "text_pool_type",
             "vision_no_ln_pre", "text_proj_bias")


def export_hf(model, checkpoint, out_dir):
    """`model`, read by CLIP.from_pretrained from `checkpoint` -> a transformers.CLIPModel folder
    (+ the run's tokenizer, where `checkpoint` is one of a run's)."""
    import transformers
    cfg = model.config
    defaults = type(cfg)()  # CLIPConfig's defaults: OpenAI's network
    options = [name for name in NOT_IN_HF if getattr(cfg, name) != getattr(defaults, name)]
    if options:
        raise UsageError(f"{checkpoint}: {', '.join(options)} set, which transformers' "
                         "CLIPModel cannot hold; keep this model in our format.")
    # HF pools at the first eos_token_id: the run's tokenizer's (it may be smaller than the
    # vocabulary), else OpenAI's layout, end-of-text the last id. data.tokenize pads with 0.
    ids = dict(bos_token_id=cfg.vocab_size - 2, eos_token_id=cfg.vocab_size - 1, pad_token_id=0)
    tokenizer_folder = run_tokenizer_folder(checkpoint)
    if tokenizer_folder:
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
