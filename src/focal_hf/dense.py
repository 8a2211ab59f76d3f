# Copyright 2026 The focal-hf authors. Licensed under the Apache License, Version 2.0.
"""A Focal backbone in transformers' dense-prediction models (`UperNetForSemanticSegmentation`,
`DetrForObjectDetection`, `Mask2FormerForUniversalSegmentation`, ...).

The heads build their backbone from `config.backbone_config` with `AutoBackbone.from_config`, so a `FocalConfig` with
`out_features` is all they need. What transformers v5 no longer does for them is load pretrained backbone weights
(`use_pretrained_backbone` is gone), and UperNet and Mask2Former refuse activation checkpointing
(`activation_checkpointing_enable()`, before transformers 5.23 `gradient_checkpointing_enable()`); these helpers do
both:

```python
>>> from transformers import UperNetConfig, UperNetForSemanticSegmentation
>>> from focal_hf.dense import enable_gradient_checkpointing, focal_backbone_config, load_backbone_weights

>>> backbone_config = focal_backbone_config("focal-tiny-converted")  # a converted classification folder
>>> model = UperNetForSemanticSegmentation(UperNetConfig(backbone_config=backbone_config, num_labels=150))
>>> backbone = load_backbone_weights(model, "focal-tiny-converted")  # the checkpoint's weights, norms initialised
>>> enable_gradient_checkpointing(model)  # optional: recompute the Focal blocks in backward
```
"""

from __future__ import annotations

import copy
import os

from torch import nn
from transformers import AutoConfig, PreTrainedModel

from .configuration_focal import FocalConfig
from .modeling_focal import FocalBackbone

ALL_STAGES = ("stage1", "stage2", "stage3", "stage4")


def focal_backbone_config(
    pretrained_model_name_or_path: str | os.PathLike, out_features: list[str] | tuple[str, ...] = ALL_STAGES, **kwargs
) -> FocalConfig:
    """The `FocalConfig` of a converted classification checkpoint (a folder or Hub id) as a dense head's
    `backbone_config`: with `out_features` (default: the four stages, what UperNet and Mask2Former use; DETR reads only
    the last) and without the classifier's labels. `kwargs` override config attributes (e.g. `drop_path_rate`) or
    go to `from_pretrained` (e.g. `revision`).

    Keep `image_size` as the checkpoint has it: it fixes each stage's window geometry and so the parameters (a stage
    whose grid is not larger than the window has no expansion tables); the backbone runs at any input size anyway.
    """
    if isinstance(out_features, str):
        raise ValueError(f"`out_features` must be a list of stage names such as {list(ALL_STAGES)}, not a string.")
    config = AutoConfig.from_pretrained(pretrained_model_name_or_path, out_features=list(out_features), **kwargs)
    if not isinstance(config, FocalConfig):
        raise ValueError(
            f"{os.fspath(pretrained_model_name_or_path)!r} holds a {type(config).__name__} (model_type "
            f"{config.model_type!r}), not a Focal Transformer checkpoint (model_type 'focal')."
        )
    # the head has its own labels: drop the classifier's (e.g. ImageNet's 1000) from the backbone's config
    config.architectures = None
    config.num_labels = 2
    return config


def find_focal_backbone(model: nn.Module) -> FocalBackbone:
    """The one `FocalBackbone` inside `model` (e.g. `model.backbone` of UperNet, `model.model.backbone.model` of DETR,
    `model.model.pixel_level_module.encoder` of Mask2Former), or `model` itself."""
    backbones = [module for module in model.modules() if isinstance(module, FocalBackbone)]
    if len(backbones) != 1:
        raise ValueError(
            f"Expected exactly one FocalBackbone inside the {type(model).__name__}, found {len(backbones)}: build the "
            f"model with a FocalConfig as its `backbone_config`."
        )
    return backbones[0]


def load_backbone_weights(
    model: nn.Module, pretrained_model_name_or_path: str | os.PathLike, **kwargs
) -> FocalBackbone:
    """Load the weights of a Focal checkpoint (a converted classification folder or Hub id, or a saved
    `FocalBackbone`) into the Focal backbone inside `model`, and return that backbone.

    Every weight of the checkpoint's Focal model is copied unchanged; what the checkpoint lacks (the backbone's
    per-stage `hidden_states_norms`) keeps its initialisation (LayerNorm: weight 1, bias 0), and so does the rest of
    `model` (its heads). The checkpoint's classifier is not used. `kwargs` go to `FocalBackbone.from_pretrained`
    (e.g. `revision`, `cache_dir`). Raises a `ValueError` if the checkpoint's architecture differs from the backbone's.
    """
    backbone = find_focal_backbone(model)
    try:
        pretrained = FocalBackbone.from_pretrained(
            pretrained_model_name_or_path, config=copy.deepcopy(backbone.config), **kwargs
        )
    except RuntimeError as error:  # transformers raises on mis-shaped weights after printing its load report
        raise ValueError(
            f"The checkpoint {os.fspath(pretrained_model_name_or_path)!r} does not fit the model's Focal backbone "
            f"(different architecture or `image_size`); build the backbone with "
            f"`focal_backbone_config({os.fspath(pretrained_model_name_or_path)!r})`. ({error})"
        ) from error
    backbone.load_state_dict(pretrained.state_dict())  # strict; copies into the model's own dtype and device
    return backbone


def enable_gradient_checkpointing(
    model: PreTrainedModel, gradient_checkpointing_kwargs: dict | None = None
) -> nn.Module:
    """Recompute activations in backward: on the whole model where it supports it (DETR: its own layers too), else
    (UperNet, Mask2Former, whose classes say they do not) on its Focal backbone. Returns the module it was enabled on.

    Use this instead of the Trainer's `--activation_checkpointing` (before transformers 5.23
    `--gradient_checkpointing`), which enables it on the whole model and so fails for UperNet and Mask2Former.
    """
    target = model if getattr(model, "supports_gradient_checkpointing", False) else find_focal_backbone(model)
    enable = getattr(target, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=gradient_checkpointing_kwargs)
    else:  # transformers releases before `activation_checkpointing_enable`
        target.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
    return target


__all__ = ["enable_gradient_checkpointing", "find_focal_backbone", "focal_backbone_config", "load_backbone_weights"]
