"""The image processor reproduces the official evaluation transform exactly, and round-trips through the Hub format."""

import logging

import numpy as np
import pytest
import torch
from conftest import FIXTURES
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoImageProcessor
from transformers.image_utils import PILImageResampling
from transformers.models.auto import image_processing_auto
from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

from focal_hf import FocalConfig, FocalImageProcessor, image_processor_from_original

OFFICIAL = load_file(FIXTURES / "eval_transform.safetensors")


@pytest.mark.parametrize("name", ["china", "flower"])
def test_official_eval_transform_is_reproduced_exactly(name):
    image = Image.open(FIXTURES / "images" / f"{name}.jpg")
    pixel_values = FocalImageProcessor()(image, return_tensors="pt").pixel_values
    assert pixel_values.shape == (1, 3, 224, 224) and pixel_values.dtype == torch.float32
    torch.testing.assert_close(pixel_values, OFFICIAL[name], rtol=0, atol=0)
    # the stock processor with the same settings is a pixel off on these photos: the one thing we change
    processor = FocalImageProcessor()
    stock = BitImageProcessorPil(
        **{key: getattr(processor, key) for key in ("size", "crop_size", "image_mean", "image_std", "resample")}
    )
    assert (stock(image, return_tensors="pt").pixel_values - OFFICIAL[name]).abs().max() > 1


def test_save_load_and_auto(tmp_path):
    FocalConfig().save_pretrained(tmp_path)
    FocalImageProcessor().save_pretrained(tmp_path)
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(loaded) is FocalImageProcessor
    image = Image.open(FIXTURES / "images" / "flower.jpg")
    torch.testing.assert_close(loaded(image, return_tensors="pt").pixel_values, OFFICIAL["flower"], rtol=0, atol=0)


def test_auto_gives_the_pil_processor_where_torchvision_is_installed(tmp_path, monkeypatch, caplog, logged_warnings):
    # torchvision does not import beside this torch, so transformers' check for it is what is replaced: with it,
    # AutoImageProcessor asks for a torchvision processor first, falls back to ours (logging it, as the README says),
    # and backend="pil" asks for ours directly
    monkeypatch.setattr(image_processing_auto, "is_torchvision_available", lambda: True)
    FocalConfig().save_pretrained(tmp_path)
    FocalImageProcessor().save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="transformers"):  # (whatever verbosity another test set)
        assert type(AutoImageProcessor.from_pretrained(tmp_path, backend="pil")) is FocalImageProcessor
        assert logged_warnings() == []
        assert type(AutoImageProcessor.from_pretrained(tmp_path)) is FocalImageProcessor
    assert logged_warnings() == ["Requested torchvision backend is not available. Falling back to pil backend."]


def test_small_images_are_padded_not_rounded():
    image = Image.new("RGB", (20, 10), color=(255, 0, 0))
    processor = FocalImageProcessor(size={"shortest_edge": 8}, crop_size={"height": 12, "width": 12})
    assert processor(image, return_tensors="pt").pixel_values.shape == (1, 3, 12, 12)


def official_eval_transform(image, image_size):
    """The official evaluation transform (torchvision `Resize(int(256 / 224 * size))`, `CenterCrop(size)`,
    `ToTensor`, `Normalize`) written out with PIL, for sizes the fixtures do not cover."""
    short = int((256 / 224) * image_size)
    width, height = image.size
    if width <= height:
        new_size = (short, int(short * height / width))
    else:
        new_size = (int(short * width / height), short)
    image = image.convert("RGB").resize(new_size, Image.BICUBIC)
    top, left = int(round((new_size[1] - image_size) / 2.0)), int(round((new_size[0] - image_size) / 2.0))
    image = image.crop((left, top, left + image_size, top + image_size))
    pixels = torch.tensor(np.asarray(image), dtype=torch.float32).permute(2, 0, 1) / 255
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    return ((pixels - mean[:, None, None]) / std[:, None, None])[None]


@pytest.mark.parametrize("image_size", [224, 384, 64])
def test_processor_follows_the_model_image_size(image_size):
    processor = FocalImageProcessor.for_image_size(FocalConfig(image_size=image_size).image_size)
    assert processor.crop_size == {"height": image_size, "width": image_size}
    assert processor.size == {"shortest_edge": {224: 256, 384: 438, 64: 73}[image_size]}
    image = Image.open(FIXTURES / "images" / "china.jpg")
    pixel_values = processor(image, return_tensors="pt").pixel_values
    assert pixel_values.shape == (1, 3, image_size, image_size)
    torch.testing.assert_close(pixel_values, official_eval_transform(image, image_size), rtol=0, atol=1e-6)
    if image_size == 224:
        assert processor.to_dict() == FocalImageProcessor().to_dict()
        torch.testing.assert_close(pixel_values, OFFICIAL["china"], rtol=0, atol=0)


def test_non_square_image_size_is_cropped_whole():
    processor = FocalImageProcessor.for_image_size([224, 320])
    assert processor.size == {"shortest_edge": 365}  # the crop's larger side fits: no padding
    image = Image.open(FIXTURES / "images" / "flower.jpg")
    assert processor(image, return_tensors="pt").pixel_values.shape == (1, 3, 224, 320)


@pytest.mark.parametrize(
    "data, test, expected",
    [
        ({}, {}, {"size": {"shortest_edge": 256}, "crop": 224, "center_crop": True, "resample": "BICUBIC"}),
        ({"IMG_SIZE": 80}, {}, {"size": {"shortest_edge": 91}, "crop": 80, "center_crop": True, "resample": "BICUBIC"}),
        (
            {"IMG_SIZE": 64, "INTERPOLATION": "lanczos"},
            {"CROP": False},
            {"size": {"height": 64, "width": 64}, "crop": 64, "center_crop": False, "resample": "LANCZOS"},
        ),
        # timm's `_pil_interp`, which the official code uses, makes everything else bilinear
        ({"INTERPOLATION": "nearest"}, {}, {"size": {"shortest_edge": 256}, "crop": 224, "resample": "BILINEAR"}),
    ],
)
def test_processor_from_the_official_config(data, test, expected):
    processor = image_processor_from_original({"MODEL": {"TYPE": "focal"}, "DATA": data, "TEST": test})
    assert processor.size == expected["size"] and processor.do_resize
    assert processor.crop_size == {"height": expected["crop"], "width": expected["crop"]}
    assert processor.do_center_crop == expected.get("center_crop", True)
    assert processor.resample == PILImageResampling[expected["resample"]]


def test_processor_from_the_official_config_at_32_px_or_less():
    # the official `resize_im = IMG_SIZE > 32`: CIFAR-sized inputs are neither resized nor cropped
    processor = image_processor_from_original({"DATA": {"IMG_SIZE": 32}})
    assert not processor.do_resize and not processor.do_center_crop
    image = Image.new("RGB", (32, 32), color=(255, 0, 0))
    assert processor(image, return_tensors="pt").pixel_values.shape == (1, 3, 32, 32)
    processor = image_processor_from_original(FIXTURES / "v1_shift_mean_64.yaml")  # the YAML file itself
    assert processor.crop_size == {"height": 64, "width": 64} and processor.size == {"shortest_edge": 73}
