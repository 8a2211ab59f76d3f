# Copyright 2026 The focal-hf authors. Licensed under the Apache License, Version 2.0.
"""Focal Transformer for Hugging Face Transformers. Importing this package registers `model_type="focal"` with
`AutoConfig`, `AutoModel`, `AutoModelForImageClassification`, `AutoBackbone` and `AutoImageProcessor`."""

from transformers import (
    AutoBackbone,
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
)

from .configuration_focal import FocalConfig
from .image_processing_focal import FocalImageProcessor
from .modeling_focal import FocalBackbone, FocalForImageClassification, FocalModel, FocalPreTrainedModel
from .original import (
    config_from_original,
    convert_original_state_dict,
    image_processor_from_original,
    load_original_checkpoint,
    official_config,
)

__version__ = "0.1.0"

AutoConfig.register(FocalConfig.model_type, FocalConfig, exist_ok=True)
AutoModel.register(FocalConfig, FocalModel, exist_ok=True)
AutoModelForImageClassification.register(FocalConfig, FocalForImageClassification, exist_ok=True)
AutoBackbone.register(FocalConfig, FocalBackbone, exist_ok=True)
AutoImageProcessor.register(FocalConfig, image_processor_classes={"pil": FocalImageProcessor}, exist_ok=True)

__all__ = [
    "FocalBackbone",
    "FocalConfig",
    "FocalForImageClassification",
    "FocalImageProcessor",
    "FocalModel",
    "FocalPreTrainedModel",
    "config_from_original",
    "convert_original_state_dict",
    "image_processor_from_original",
    "load_original_checkpoint",
    "official_config",
]
