# Copyright 2026 The focal-hf authors. Licensed under the Apache License, Version 2.0.
"""Image processor reproducing the official Focal Transformer evaluation transform."""

from .requirements import check_requirements  # noqa: F401 (first: an old torch or transformers is named here)

# isort: split
import numpy as np
from PIL import Image
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling, SizeDict
from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

# PIL grey modes of more than 8 bits, and the value that becomes 255
HIGH_BIT_DEPTH_MAXIMUM = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}


def to_8_bit(image):
    """A 16-bit (`I;16*`) or 32-bit (`I`, `F`) grey PIL image as an 8-bit one (`L`), scaled to 0..255; other input
    unchanged. PIL's own conversion to RGB clips such images (to white, mostly). Integer images are read as 16-bit
    (what PIL opens 16-bit PNG and TIFF files as), float ones as 0..1; values outside those ranges are refused."""
    if not isinstance(image, Image.Image) or image.mode not in HIGH_BIT_DEPTH_MAXIMUM:
        return image
    maximum = HIGH_BIT_DEPTH_MAXIMUM[image.mode]
    values = np.asarray(image).astype(np.float64)
    if values.size and (values.min() < 0 or values.max() > maximum or not np.isfinite(values).all()):
        raise ValueError(
            f"Cannot scale a mode {image.mode!r} image with values in [{values.min()}, {values.max()}] to 8 bits: "
            f"expected values in [0, {maximum}]. Convert it to an 8-bit image (mode 'L' or 'RGB') first."
        )
    return Image.fromarray(np.rint(values * (255 / maximum)).astype(np.uint8))


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

    def process_image(self, image, *args, **kwargs) -> np.ndarray:
        """As transformers' PIL backend, with 16- and 32-bit grey images scaled to 8 bits first (`to_8_bit`)."""
        return super().process_image(to_8_bit(image), *args, **kwargs)


__all__ = ["FocalImageProcessor", "to_8_bit"]
