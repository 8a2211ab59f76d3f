# Copyright 2026 The focal-hf authors. Licensed under the Apache License, Version 2.0.
"""Interoperability with the official release (microsoft/Focal-Transformer): its YAML configs, its checkpoints
and its named ImageNet-1K architectures."""

from __future__ import annotations

import logging
import os
import re
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from transformers.image_utils import PILImageResampling

from .configuration_focal import FocalConfig, field_type_error
from .image_processing_focal import FocalImageProcessor

logger = logging.getLogger(__name__)

# Official `config.py` defaults under MODEL.FOCAL, and where each one goes in FocalConfig (None: accepted, unused
# by the official model code as well).
_FOCAL_DEFAULTS: dict[str, tuple[str | None, Any]] = {
    "PATCH_SIZE": ("patch_size", 4),
    "IN_CHANS": ("num_channels", 3),
    "EMBED_DIM": ("embed_dim", 96),
    "DEPTHS": ("depths", [2, 2, 6, 2]),
    "NUM_HEADS": ("num_heads", [3, 6, 12, 24]),
    "WINDOW_SIZE": ("window_size", 7),
    "MLP_RATIO": ("mlp_ratio", 4.0),
    "QKV_BIAS": ("qkv_bias", True),
    "QK_SCALE": ("qk_scale", False),
    "APE": ("use_absolute_embeddings", False),
    "PATCH_NORM": ("patch_norm", True),
    "USE_SHIFT": ("use_shift", False),
    "FOCAL_POOL": ("focal_pool", "none"),
    "FOCAL_STAGES": ("focal_stages", [0, 1, 2, 3]),
    "FOCAL_LEVELS": ("focal_levels", [1, 1, 1, 1]),
    "FOCAL_WINDOWS": ("focal_windows", [7, 5, 3, 1]),
    "EXPAND_STAGES": (None, [0, 1, 2, 3]),  # passed to the official model, which never reads it
    "EXPAND_SIZES": ("expand_sizes", [3, 3, 3, 3]),
    "EXPAND_LAYER": ("expand_layer", "all"),
    "USE_CONV_EMBED": ("use_conv_embed", False),
    "USE_LAYERSCALE": ("use_layerscale", False),
    "USE_PRE_NORM": ("use_pre_norm", False),
    "FOCAL_TOPK": ("focal_topk", 128),  # used by Focal-fast (`focalv2`) only
}
# official MODEL.TYPE -> FocalConfig.attention_type
_MODEL_TYPES = {"focal": "focal", "focalv2": "focal_fast"}


def _read_original_config(path_or_dict) -> dict:
    if isinstance(path_or_dict, Mapping):
        return dict(path_or_dict)
    if isinstance(path_or_dict, (str, os.PathLike)):
        import yaml

        try:
            with open(path_or_dict, encoding="utf-8") as handle:
                parsed = yaml.safe_load(handle)
        except OSError as error:
            raise ValueError(f"Cannot read the official config {os.fspath(path_or_dict)!r}: {error}") from error
        except yaml.YAMLError as error:
            raise ValueError(f"{os.fspath(path_or_dict)!r} is not valid YAML: {error}") from error
        if not isinstance(parsed, Mapping):
            raise ValueError(f"{os.fspath(path_or_dict)!r} does not hold an official config (a YAML mapping).")
        return dict(parsed)
    raise TypeError(f"Expected a path to an official YAML config or its dict, got {type(path_or_dict).__name__}.")


def config_from_original(path_or_dict, **kwargs) -> FocalConfig:
    """Build a `FocalConfig` from the official YAML schema (`MODEL.TYPE`, `MODEL.NUM_CLASSES`, `MODEL.DROP_RATE`,
    `MODEL.DROP_PATH_RATE`, `MODEL.FOCAL.*`, `DATA.IMG_SIZE`), a path to such a file or the parsed dict. Absent keys
    take the official defaults; unknown `MODEL.FOCAL` keys are an error. `kwargs` override the result's attributes
    (e.g. `id2label`)."""
    return FocalConfig(**{**config_kwargs_from_original(path_or_dict), **kwargs})


def config_kwargs_from_original(path_or_dict) -> dict:
    """`FocalConfig` keyword arguments for an official config (YAML path or dict), as `config_from_original`
    documents. A value of the wrong type raises a `ValueError` naming its key; keys outside the official schema are
    reported with a warning (they have no effect), unknown `MODEL.FOCAL` keys are an error."""
    original = _read_original_config(path_or_dict)
    model = _section(original, "MODEL")
    data = _section(original, "DATA")
    focal = _section(model, "FOCAL", "MODEL.")
    _warn_unknown(original, _SECTIONS, "")
    _warn_unknown(model, _MODEL_KEYS, "MODEL.")
    _warn_unknown(data, _DATA_KEYS, "DATA.")
    model_type = model.get("TYPE", "focal")
    if model_type not in _MODEL_TYPES:
        raise ValueError(f"MODEL.TYPE must be one of {sorted(_MODEL_TYPES)}; got {model_type!r}.")
    unknown = sorted(set(focal) - set(_FOCAL_DEFAULTS))
    if unknown:
        raise ValueError(f"Unknown MODEL.FOCAL keys {unknown}; the official schema has {sorted(_FOCAL_DEFAULTS)}.")

    kwargs: dict[str, Any] = {}
    keys: dict[str, str] = {}  # FocalConfig name -> official key, for error messages
    for key, (name, default) in _FOCAL_DEFAULTS.items():
        if name is not None:
            kwargs[name], keys[name] = focal.get(key, default), f"MODEL.FOCAL.{key}"
    kwargs["attention_type"] = _MODEL_TYPES[model_type]
    kwargs["qk_scale"] = kwargs["qk_scale"] or None  # the official `QK_SCALE: False` means head_dim ** -0.5
    kwargs["image_size"], keys["image_size"] = data.get("IMG_SIZE", 224), "DATA.IMG_SIZE"
    kwargs["num_labels"], keys["num_labels"] = model.get("NUM_CLASSES", 1000), "MODEL.NUM_CLASSES"
    kwargs["hidden_dropout_prob"], keys["hidden_dropout_prob"] = model.get("DROP_RATE", 0.0), "MODEL.DROP_RATE"
    kwargs["drop_path_rate"], keys["drop_path_rate"] = model.get("DROP_PATH_RATE", 0.1), "MODEL.DROP_PATH_RATE"
    for name, key in keys.items():
        error = _type_error(name, kwargs[name], key)
        if error:
            raise ValueError(error)
    return kwargs


# the official yacs schema (microsoft/Focal-Transformer `config.py`): its top-level keys, and those of MODEL and DATA
_SECTIONS = set(
    "BASE DATA MODEL TRAIN AUG TEST AMP_OPT_LEVEL OUTPUT TAG SAVE_FREQ PRINT_FREQ SEED EVAL_MODE THROUGHPUT_MODE "
    "DEBUG_MODE LOCAL_RANK".split()
)
_MODEL_KEYS = set("TYPE NAME RESUME NUM_CLASSES DROP_RATE DROP_PATH_RATE LABEL_SMOOTHING SPEC FOCAL".split())
_DATA_KEYS = set(
    "BATCH_SIZE DATA_PATH DATASET IMG_SIZE INTERPOLATION ZIP_MODE CACHE_MODE PIN_MEMORY NUM_WORKERS".split()
)


def _section(parent: Mapping, key: str, prefix: str = "") -> Mapping:
    value = parent.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{prefix}{key} must be a section (a mapping of keys); got {value!r}.")
    return value


def _warn_unknown(section: Mapping, known: set[str], prefix: str) -> None:
    unknown = sorted(str(key) for key in set(section) - known)
    if unknown:
        logger.warning(
            f"Ignoring {', '.join(prefix + key for key in unknown)}: not in the official config schema (a typo?); "
            f"they have no effect."
        )


def _type_error(name: str, value: Any, key: str) -> str | None:
    """Why the official `key`'s `value` cannot be `FocalConfig` field `name`, or `None`."""
    if name == "num_labels":  # a property of PreTrainedConfig, not a field
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else f"`{key}` must be int; got {value!r} ({type(value).__name__})."
    return field_type_error(name, value, key)


# official DATA.INTERPOLATION -> PIL resampling (timm's `_pil_interp`, which the official code uses: anything else,
# "random" and "nearest" included, is bilinear at evaluation)
_INTERPOLATIONS = {
    "bicubic": PILImageResampling.BICUBIC,
    "lanczos": PILImageResampling.LANCZOS,
    "hamming": PILImageResampling.HAMMING,
}


def image_processor_from_original(path_or_dict) -> FocalImageProcessor:
    """The official evaluation transform of an official config (YAML path or dict) as a `FocalImageProcessor`:
    `DATA.IMG_SIZE` (default 224), `DATA.INTERPOLATION` (bicubic) and `TEST.CROP` (True: resize the shorter side to
    `int(256 / 224 * IMG_SIZE)`, centre-crop `IMG_SIZE`; False: resize to `IMG_SIZE`). As in the official code, an
    `IMG_SIZE` of 32 or less is neither resized nor cropped."""
    original = _read_original_config(path_or_dict)
    data = _section(original, "DATA")
    image_size = data.get("IMG_SIZE", 224)
    resample = _INTERPOLATIONS.get(data.get("INTERPOLATION", "bicubic"), PILImageResampling.BILINEAR)
    crop = bool(_section(original, "TEST").get("CROP", True))
    processor = FocalImageProcessor.for_image_size(image_size, crop=crop, resample=resample)
    if min(processor.crop_size["height"], processor.crop_size["width"]) <= 32:  # the official `IMG_SIZE > 32`
        processor.do_resize = processor.do_center_crop = False
    return processor


# ------------------------------------------------------------------------------------------------- presets
_SIZES = {
    "tiny": {"embed_dim": 96, "depths": [2, 2, 6, 2], "num_heads": [3, 6, 12, 24]},
    "small": {"embed_dim": 96, "depths": [2, 2, 18, 2], "num_heads": [3, 6, 12, 24]},
    "base": {"embed_dim": 128, "depths": [2, 2, 18, 2], "num_heads": [4, 8, 16, 32]},
}
# what every official ImageNet-1K YAML sets besides the size
_IMAGENET_FOCAL = {
    "focal_pool": "fc",
    "focal_levels": [2, 2, 2, 2],
    "focal_windows": [7, 5, 3, 1],
    "expand_sizes": [3, 3, 3, 3],
    "window_size": 7,
    "drop_path_rate": 0.2,
}
OFFICIAL_MODELS: dict[str, dict[str, Any]] = {}
for _size, _dims in _SIZES.items():
    OFFICIAL_MODELS[f"focal-{_size}"] = {**_IMAGENET_FOCAL, **_dims}
    OFFICIAL_MODELS[f"focal-{_size}-useconv"] = {**_IMAGENET_FOCAL, **_dims, "use_conv_embed": True}
for _size, _dims in _SIZES.items():
    OFFICIAL_MODELS[f"focal-fast-{_size}"] = {
        **_IMAGENET_FOCAL,
        **_dims,
        "use_conv_embed": True,
        "attention_type": "focal_fast",
        "focal_topk": 128,
    }


def official_config(name: str, **kwargs) -> FocalConfig:
    """The `FocalConfig` of an official ImageNet-1K architecture (1000 classes, 224 px), e.g. `"focal-tiny"`.
    `kwargs` override attributes (e.g. `num_labels`, `out_features`)."""
    if name not in OFFICIAL_MODELS:
        raise ValueError(f"Unknown official model {name!r}; choose one of {sorted(OFFICIAL_MODELS)}.")
    return FocalConfig(**{"image_size": 224, "num_labels": 1000, **OFFICIAL_MODELS[name], **kwargs})


# ------------------------------------------------------------------------------------------- state dicts
# official key (regex) -> ours; blocks and stages keep their indices
_BLOCK = r"^layers\.(\d+)\.blocks\.(\d+)\."
_OUR_BLOCK = r"focal.encoder.layers.\1.blocks.\2."
_KEY_RULES = [
    (r"^patch_embed\.proj\.", "focal.embeddings.patch_embeddings.projection."),
    (r"^patch_embed\.(norm|pre_norm)\.", r"focal.embeddings.patch_embeddings.\1."),
    (r"^absolute_pos_embed$", "focal.embeddings.position_embeddings"),
    (r"^layers\.(\d+)\.downsample\.proj\.", r"focal.encoder.layers.\1.downsample.projection."),
    (r"^layers\.(\d+)\.downsample\.(norm|pre_norm)\.", r"focal.encoder.layers.\1.downsample.\2."),
    (_BLOCK + r"norm1\.", _OUR_BLOCK + "layernorm_before."),
    (_BLOCK + r"norm2\.", _OUR_BLOCK + "layernorm_after."),
    (_BLOCK + r"attn\.coord2rpb_all\.", _OUR_BLOCK + "attention.relative_position_mlps."),
    (_BLOCK + r"attn\.", _OUR_BLOCK + "attention."),
    (_BLOCK + r"pool_layers\.", _OUR_BLOCK + "window_pooling.pool_layers."),
    (_BLOCK + r"mlp\.", _OUR_BLOCK + "mlp."),
    (_BLOCK + r"gamma_(\d)$", _OUR_BLOCK + r"layer_scale_\3"),
    (r"^norm\.", "focal.layernorm."),
    (r"^head\.", "classifier."),
]
# buffers the official code saves and we recompute from the config
_DERIVED_BUFFERS = re.compile(
    r"(relative_position_index(_\d+)?|valid_ind_rolled|valid_ind_unfold_\d+|attn_mask|window_coords"
    r"|topk_cloest_indice_\d+|topk_cloest_coords_\d+)$"
)


def rename_original_key(key: str) -> str | None:
    """Our name of an official state-dict key, or `None` for a buffer we recompute."""
    if _DERIVED_BUFFERS.search(key):
        return None
    for pattern, replacement in _KEY_RULES:
        renamed, count = re.subn(pattern, replacement, key)
        if count:
            return renamed
    return key  # unknown: reported as unexpected


def expected_state_dict_shapes(config: FocalConfig) -> dict[str, torch.Size]:
    """Names and shapes of the parameters a `FocalForImageClassification` of `config` has (built on the meta device)."""
    from .modeling_focal import FocalForImageClassification

    with torch.device("meta"):
        model = FocalForImageClassification(config)
    return {name: tensor.shape for name, tensor in model.state_dict().items()}


def convert_original_state_dict(state_dict: Mapping[str, torch.Tensor], config: FocalConfig) -> dict[str, torch.Tensor]:
    """Convert an official checkpoint's state dict (raw or `{"model": state_dict}`) to `FocalForImageClassification`
    keys for `config`. Buffers we recompute are dropped; missing, unexpected or mis-shaped keys raise a `ValueError`
    naming them."""
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"Expected a state dict (a mapping of names to tensors), got {type(state_dict).__name__}.")
    if "model" in state_dict and isinstance(state_dict["model"], Mapping):
        state_dict = state_dict["model"]
    expected = expected_state_dict_shapes(config)
    converted: dict[str, torch.Tensor] = {}
    unexpected, mismatched, mismatched_names = [], [], set()
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"Checkpoint entry {key!r} is a {type(value).__name__}, not a tensor.")
        new_key = rename_original_key(key)
        if new_key is None:
            continue
        if new_key not in expected:
            unexpected.append(key)
        elif value.shape != expected[new_key]:
            mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(expected[new_key])}")
            mismatched_names.add(new_key)
        else:
            converted[new_key] = value
    missing = sorted(set(expected) - set(converted) - mismatched_names)
    problems = []
    if missing:
        problems.append(f"missing keys (the model has them, the checkpoint does not): {missing}")
    if unexpected:
        problems.append(f"unexpected keys (not in the model): {sorted(unexpected)}")
    if mismatched:
        problems.append(f"mis-shaped keys: {mismatched}")
    if problems:
        raise ValueError("The checkpoint does not match the config: " + "; ".join(problems))
    return converted


# The official training script (`utils.save_checkpoint`) saves the run's config, a yacs `CfgNode` (a `dict` subclass
# holding only plain values), beside the weights: it is read as nested `OrderedDict`s, without importing yacs.
_SAVED_CONFIG_CLASSES = [(OrderedDict, "yacs.config.CfgNode")]


def load_original_state_dict(checkpoint_path: str | os.PathLike) -> Mapping[str, torch.Tensor]:
    """Read an official `.pth` checkpoint safely (`weights_only=True`): a state dict, `{"model": state_dict}`, or a
    checkpoint of the official training script (the weights under `"model"` beside the optimizer's and scheduler's
    states and the run's config, `saved_original_config`). A clear `ValueError` if it is none of them."""
    try:
        with torch.serialization.safe_globals(_SAVED_CONFIG_CLASSES):
            checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # pickle, zip and weights-only errors all mean: not a usable checkpoint
        raise ValueError(
            f"{os.fspath(checkpoint_path)!r} is not a readable PyTorch checkpoint of tensors: {error}"
        ) from error
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{os.fspath(checkpoint_path)!r} holds a {type(checkpoint).__name__}, not a state dict.")
    return checkpoint


def saved_original_config(checkpoint: Mapping, checkpoint_path: str | os.PathLike) -> Mapping:
    """The official config saved in a checkpoint of the official training script (`checkpoint["config"]`, as
    `load_original_state_dict` reads it from `checkpoint_path`), for `config_from_original` and
    `image_processor_from_original`. A `ValueError` if it holds none (released checkpoints and plain state dicts do
    not)."""
    config = checkpoint.get("config")
    if not isinstance(config, Mapping) or "MODEL" not in config:
        raise ValueError(
            f"{os.fspath(checkpoint_path)!r} holds no official config (only checkpoints saved by the official "
            f"training script do): give the official YAML config it was trained with."
        )
    return config


def load_original_checkpoint(checkpoint_path: str | os.PathLike, config_path=None) -> FocalForImageClassification:  # noqa: F821
    """Build the model an official config describes (a YAML path or its dict; without one, the config saved in a
    checkpoint of the official training script) and load an official checkpoint into it (eval mode)."""
    from .modeling_focal import FocalForImageClassification

    checkpoint = load_original_state_dict(checkpoint_path)
    if config_path is None:
        config_path = saved_original_config(checkpoint, checkpoint_path)
    config = config_from_original(config_path)
    state_dict = convert_original_state_dict(checkpoint, config)
    model = FocalForImageClassification(config)
    model.load_state_dict(state_dict)
    return model.eval()
