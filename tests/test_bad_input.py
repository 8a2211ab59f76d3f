"""Bad values and unusual input: a clear error naming the problem, or the right result — never a deep traceback or
a silently wrong answer. Config fields, official YAML configs, pixel values and high-bit-depth images."""

import logging

import numpy as np
import pytest
import torch
from conftest import FIXTURES, tiny_config
from huggingface_hub.errors import StrictDataclassClassValidationError
from PIL import Image

from focal_hf import FocalBackbone, FocalConfig, FocalForImageClassification, FocalImageProcessor, config_from_original
from focal_hf.image_processing_focal import to_8_bit


# ----------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "field, value, message",
    [
        ("embed_dim", "16", "`embed_dim` must be int; got '16' (str)"),
        ("embed_dim", 16.0, "`embed_dim` must be int; got 16.0 (float)"),
        ("embed_dim", True, "`embed_dim` must be int; got True (bool)"),  # bool is no int here
        ("window_size", 4.5, "`window_size` must be int"),
        ("patch_size", None, "`patch_size` must be int"),
        ("focal_topk", "128", "`focal_topk` must be int"),
        ("depths", [1, 1.0, 2, 1], "`depths` must be list[int]"),
        ("num_heads", "1224", "`num_heads` must be list[int]"),
        ("image_size", [64, "64"], "`image_size` must be int | list[int]"),
        ("mlp_ratio", "4", "`mlp_ratio` must be float | int; got '4' (str)"),
        ("drop_path_rate", "0.1", "`drop_path_rate` must be float | int"),
        ("layer_norm_eps", None, "`layer_norm_eps` must be float | int"),
        ("qk_scale", True, "`qk_scale` must be float | int | None"),
        ("qkv_bias", 1, "`qkv_bias` must be bool; got 1 (int)"),
        ("focal_pool", 3, "`focal_pool` must be str"),
        ("mlp_ratio", 0, "`mlp_ratio` must be > 0; got 0"),
        ("mlp_ratio", -1.5, "`mlp_ratio` must be > 0"),
    ],
)
def test_config_field_of_the_wrong_type_or_value_is_named(field, value, message):
    with pytest.raises(ValueError) as error:
        tiny_config(**{field: value})
    assert str(error.value).startswith(message)


def test_config_types_accept_what_they_should():
    config = tiny_config(mlp_ratio=3, layer_norm_eps=1, drop_path_rate=0, image_size=(64, 96), qk_scale=0.25)
    assert config.mlp_ratio == 3 and config.image_size == [64, 96]
    reloaded = FocalConfig.from_dict(config.to_dict())
    assert reloaded.to_dict() == config.to_dict()


def test_config_types_are_checked_again_on_validate():
    config = tiny_config()
    config.embed_dim = "16"
    with pytest.raises(StrictDataclassClassValidationError, match="`embed_dim` must be int"):
        config.validate()


# ------------------------------------------------------------------------------------------- official YAML
@pytest.mark.parametrize(
    "original, message",
    [
        ({"MODEL": {"FOCAL": {"WINDOW_SIZE": 4.5}}}, "`MODEL.FOCAL.WINDOW_SIZE` must be int; got 4.5 (float)"),
        ({"MODEL": {"FOCAL": {"DEPTHS": [2, "2", 6, 2]}}}, "`MODEL.FOCAL.DEPTHS` must be list[int]"),
        ({"MODEL": {"FOCAL": {"EMBED_DIM": "96"}}}, "`MODEL.FOCAL.EMBED_DIM` must be int; got '96' (str)"),
        ({"MODEL": {"FOCAL": {"MLP_RATIO": "4."}}}, "`MODEL.FOCAL.MLP_RATIO` must be float | int"),
        ({"MODEL": {"FOCAL": {"QK_SCALE": True}}}, "`MODEL.FOCAL.QK_SCALE` must be float | int | None"),
        ({"MODEL": {"FOCAL": {"USE_SHIFT": "yes"}}}, "`MODEL.FOCAL.USE_SHIFT` must be bool"),
        ({"MODEL": {"NUM_CLASSES": 10.0}}, "`MODEL.NUM_CLASSES` must be int; got 10.0 (float)"),
        ({"MODEL": {"DROP_PATH_RATE": "0.2"}}, "`MODEL.DROP_PATH_RATE` must be float | int"),
        ({"DATA": {"IMG_SIZE": "224"}}, "`DATA.IMG_SIZE` must be int | list[int]"),
        ({"MODEL": 5}, "MODEL must be a section (a mapping of keys); got 5"),
        ({"MODEL": {"FOCAL": [1, 2]}}, "MODEL.FOCAL must be a section"),
    ],
)
def test_yaml_value_of_the_wrong_type_names_its_key(original, message):
    with pytest.raises(ValueError) as error:
        config_from_original(original)
    assert str(error.value).startswith(message)


def test_yaml_keys_outside_the_official_schema_are_reported(caplog, tmp_path):
    official = (FIXTURES / "v1_fc_224.yaml").read_text()
    with caplog.at_level(logging.WARNING, logger="focal_hf.original"):
        config_from_original(FIXTURES / "v1_fc_224.yaml")
    assert caplog.text == ""  # an official file: nothing to report
    path = tmp_path / "typos.yaml"
    path.write_text(official + "MODLE:\n  TYPE: focalv2\nTRAIN:\n  EPOCHS: 3\nSEED: 1\n")
    with caplog.at_level(logging.WARNING, logger="focal_hf.original"):
        config = config_from_original(path)
    assert "Ignoring MODLE: not in the official config schema" in caplog.text
    assert "TRAIN" not in caplog.text and "SEED" not in caplog.text  # official sections, unused here
    assert config.attention_type == "focal"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="focal_hf.original"):
        config_from_original({"MODEL": {"NUM_CLASES": 10, "LABEL_SMOOTHING": 0.1}, "DATA": {"IMG_SZE": 1}})
    assert "Ignoring MODEL.NUM_CLASES" in caplog.text and "Ignoring DATA.IMG_SZE" in caplog.text
    assert "LABEL_SMOOTHING" not in caplog.text


# ---------------------------------------------------------------------------------------------- pixel values
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_pixel_values_of_another_float_dtype_are_cast_to_the_model_dtype(dtype):
    model = FocalForImageClassification(tiny_config()).eval()
    pixel_values = torch.randn(2, 3, 64, 64).to(dtype)
    with torch.no_grad():
        logits = model(pixel_values).logits
        expected = model(pixel_values.float()).logits
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    backbone = FocalBackbone(tiny_config(out_features=["stage1"])).eval()
    with torch.no_grad():
        assert backbone(pixel_values).feature_maps[0].dtype == torch.float32


def test_pixel_values_cast_to_a_half_precision_model():
    model = FocalForImageClassification(tiny_config()).to(torch.bfloat16).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).logits.dtype == torch.bfloat16


def test_empty_batch_is_a_clear_error():
    model = FocalForImageClassification(tiny_config()).eval()
    with pytest.raises(ValueError, match=r"batch_size >= 1, got an empty batch \(0, 3, 64, 64\)"):
        model(torch.zeros(0, 3, 64, 64))


# -------------------------------------------------------------------------------------- high-bit-depth images
RAMP = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (32, 1))  # black to white, left to right
EXPECTED = np.rint(RAMP / 257) / 255  # the same ramp in 8 bits, scaled to [0, 1]


@pytest.mark.parametrize(
    "array, mode",
    [
        (RAMP, "I;16"),
        (RAMP.astype(">u2"), "I;16B"),
        (RAMP.astype(np.int32), "I"),
        ((RAMP / 65535).astype(np.float32), "F"),
    ],
)
def test_high_bit_depth_grey_images_are_scaled_not_clipped(array, mode):
    image = Image.fromarray(array)
    assert image.mode == mode
    processor = FocalImageProcessor(do_resize=False, do_center_crop=False, do_normalize=False)
    pixel_values = processor(image, return_tensors="pt").pixel_values
    assert pixel_values.shape == (1, 3, 32, 64)
    for channel in range(3):
        np.testing.assert_allclose(pixel_values[0, channel].numpy(), EXPECTED, rtol=0, atol=1e-6)
    assert pixel_values.min() == 0 and pixel_values.max() == 1 and 0.45 < pixel_values.mean() < 0.55


def test_16_bit_png_through_the_whole_processor(tmp_path):
    Image.fromarray(RAMP).save(tmp_path / "ramp.png")  # a 16-bit grey PNG
    image = Image.open(tmp_path / "ramp.png")
    assert image.mode.startswith("I")
    eight_bit = Image.fromarray(np.rint(RAMP / 257).astype(np.uint8)).convert("RGB")
    torch.testing.assert_close(
        FocalImageProcessor()(image, return_tensors="pt").pixel_values,
        FocalImageProcessor()(eight_bit, return_tensors="pt").pixel_values,
        rtol=0,
        atol=0,
    )


def test_16_bit_png_through_the_pipeline_as_the_readme_says(tmp_path):
    """transformers' pipeline converts paths and PIL images to RGB before the processor (clipping 16-bit ones, a
    limitation the README states); `to_8_bit` first gives the processor's result."""
    from transformers import pipeline

    Image.fromarray(RAMP).save(tmp_path / "ramp.png")
    model = FocalForImageClassification(tiny_config(image_size=32)).eval()
    processor = FocalImageProcessor.for_image_size(32)
    classifier = pipeline("image-classification", model=model, image_processor=processor)
    with torch.no_grad():
        expected = torch.softmax(
            model(processor(Image.open(tmp_path / "ramp.png"), return_tensors="pt").pixel_values).logits, -1
        )
    scores = {
        how: {p["label"]: p["score"] for p in classifier(image, top_k=None)}
        for how, image in [("8-bit", to_8_bit(Image.open(tmp_path / "ramp.png"))), ("path", str(tmp_path / "ramp.png"))]
    }
    expected = {model.config.id2label[i]: score for i, score in enumerate(expected[0].tolist())}
    assert scores["8-bit"] == pytest.approx(expected, abs=1e-6)
    assert scores["path"] != pytest.approx(expected, abs=1e-6)  # clipped to white by the pipeline's `load_image`


@pytest.mark.parametrize(
    "array, message",
    [
        (np.full((8, 8), 70000, np.int32), r"values in \[70000.0, 70000.0\].*expected values in \[0, 65535\]"),
        (np.full((8, 8), -1, np.int32), r"mode 'I' image"),
        (np.full((8, 8), 2.0, np.float32), r"mode 'F' image.*expected values in \[0, 1.0\]"),
        (np.full((8, 8), np.nan, np.float32), r"mode 'F' image"),
    ],
)
def test_out_of_range_high_bit_depth_images_are_refused(array, message):
    with pytest.raises(ValueError, match=message):
        FocalImageProcessor()(Image.fromarray(array))


def test_other_images_are_left_alone():
    image = Image.new("RGB", (4, 4), (1, 2, 3))
    assert to_8_bit(image) is image and to_8_bit(Image.new("L", (4, 4))).mode == "L"
