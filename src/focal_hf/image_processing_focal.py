# Copyright 2026 The focal-hf authors. Licensed under the Apache License, Version 2.0.
"""Image processor reproducing the official Focal Transformer evaluation transform."""

import numpy as np
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling, SizeDict
from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil


class FocalImageProcessor(BitImageProcessorPil):
    r"""
    transformers' PIL `BitImageProcessor` set up as the official evaluation transform: resize the shorter side to
    256 (PIL bicubic), centre-crop 224, scale to [0, 1], normalise with the ImageNet mean and std. For a model built
    for another `image_size`, `FocalImageProcessor.for_image_size(config.image_size)` crops that size and resizes
    in the same 256:224 ratio, as the official code does.

    The one change is the centre crop's offset, rounded as torchvision rounds it (`int(round((h - 224) / 2))`, which
    the official code used) where transformers rounds down: on images whose resized side leaves an odd margin the
    crops otherwise differ by a pixel.
    """

    model_input_names = ["pixel_values"]
    resample = PILImageResampling.BICUBIC
    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD
    size = {"shortest_edge": 256}
    crop_size = {"height": 224, "width": 224}
    do_center_crop = True

    @classmethod
    def for_image_size(cls, image_size, crop: bool = True, **kwargs) -> "FocalImageProcessor":
        """The official evaluation transform for a model built for `image_size` (an int or `(height, width)`, e.g.
        `config.image_size`). With `crop` (the official `TEST.CROP`), the shorter side is resized to
        `int(256 / 224 * image_size)` (the official code's expression: 256 for 224, 438 for 384) and the centre
        `image_size` crop is taken; without, images are resized to `image_size`. `kwargs` set other attributes
        (e.g. `resample`)."""
        height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        crop_size = {"height": height, "width": width}
        if crop:  # a non-square crop fits inside the resized image: scale its larger side
            size = {"shortest_edge": int((256 / 224) * max(height, width))}
        else:
            size = crop_size
        return cls(**{"size": size, "crop_size": crop_size, "do_center_crop": crop, **kwargs})

    def center_crop(self, image: np.ndarray, size: SizeDict, **kwargs) -> np.ndarray:
        """Crop `(channels, height, width)` to `size` around the centre, offsets rounded half to even."""
        height, width = image.shape[-2:]
        if size.height > height or size.width > width:
            return super().center_crop(image, size, **kwargs)  # pads: nothing to round
        top = int(round((height - size.height) / 2.0))
        left = int(round((width - size.width) / 2.0))
        return image[..., top : top + size.height, left : left + size.width]


__all__ = ["FocalImageProcessor"]
