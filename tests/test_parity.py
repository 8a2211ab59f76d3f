"""Exact parity with the official implementation, on the reference fixtures it produced, and official-format interop."""

import json
import sys

import pytest
import torch
from conftest import FIXTURES, PARITY_CASES, official_training_checkpoint
from safetensors.torch import load_file

import focal_hf
from focal_hf import convert_original_state_dict, load_original_checkpoint, official_config
from focal_hf.modeling_focal import focal_fast_key_layout, window_order
from focal_hf.original import OFFICIAL_MODELS

OFFICIAL = json.loads((FIXTURES / "official_checkpoints.json").read_text())
TOLERANCE = 1e-4


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("case", PARITY_CASES)
def test_outputs_match_official(case, attn_implementation):
    model = load_original_checkpoint(FIXTURES / f"{case}.pth", FIXTURES / f"{case}.yaml")
    model.config._attn_implementation = attn_implementation
    assert not model.training
    io = load_file(FIXTURES / f"{case}.io.safetensors")
    with torch.no_grad():
        outputs = model(io["pixel_values"], output_hidden_states=True)
        stages = model.focal(
            io["pixel_values"], output_hidden_states=True, output_hidden_states_before_downsampling=True
        )
    torch.testing.assert_close(outputs.logits, io["logits"], atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(stages.pooler_output, io["pooled"], atol=TOLERANCE, rtol=0)
    for stage in range(1, 5):
        ours = stages.reshaped_hidden_states[stage].flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C)
        torch.testing.assert_close(ours, io[f"stage{stage}"], atol=TOLERANCE, rtol=0)
    # the last stage has no downsampling: its output is the same in both conventions
    torch.testing.assert_close(outputs.reshaped_hidden_states[4], stages.reshaped_hidden_states[4])


def test_original_config_reading():
    config = focal_hf.config_from_original(FIXTURES / "v2_useconv_224.yaml")
    assert config.attention_type == "focal_fast" and config.focal_topk == 128
    assert config.use_conv_embed and config.num_labels == 10 and config.embed_dim == 16
    assert config.qk_scale is None  # absent key: official default QK_SCALE False = head_dim ** -0.5
    v1 = focal_hf.config_from_original(FIXTURES / "v1_fc_224.yaml")
    assert v1.attention_type == "focal" and not v1.use_conv_embed and v1.focal_pool == "fc"


def test_original_config_defaults_for_absent_keys():
    config = focal_hf.config_from_original({"MODEL": {"TYPE": "focal"}})
    assert config.image_size == 224 and config.num_labels == 1000 and config.patch_size == 4
    assert config.embed_dim == 96 and config.depths == [2, 2, 6, 2] and config.num_heads == [3, 6, 12, 24]
    assert config.focal_pool == "none" and config.focal_levels == [1, 1, 1, 1]
    assert config.focal_windows == [7, 5, 3, 1] and config.expand_sizes == [3, 3, 3, 3]
    assert config.expand_layer == "all" and config.window_size == 7 and config.drop_path_rate == 0.1
    assert not (config.use_shift or config.use_conv_embed or config.use_layerscale or config.use_pre_norm)
    scaled = focal_hf.config_from_original({"MODEL": {"FOCAL": {"QK_SCALE": 0.25}}, "DATA": {"IMG_SIZE": 256}})
    assert scaled.qk_scale == 0.25 and scaled.image_size == 256


@pytest.mark.parametrize(
    "original, message",
    [
        ({"MODEL": {"TYPE": "swin"}}, "MODEL.TYPE"),
        ({"MODEL": {"FOCAL": {"FOCAL_LEVEL": [2, 2, 2, 2]}}}, "FOCAL_LEVEL"),
        ({"MODEL": {"FOCAL": {"FOCAL_POOL": "avg"}}}, "focal_pool"),
    ],
)
def test_original_config_errors(original, message):
    with pytest.raises(ValueError, match=message):
        focal_hf.config_from_original(original)


def test_original_config_unreadable_file(tmp_path):
    (tmp_path / "bad.yaml").write_text("MODEL: [unclosed")
    with pytest.raises(ValueError, match="not valid YAML"):
        focal_hf.config_from_original(tmp_path / "bad.yaml")
    with pytest.raises(ValueError, match="Cannot read"):
        focal_hf.config_from_original(tmp_path / "missing.yaml")


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_every_official_architecture_converts_exactly(name):
    entry = OFFICIAL[name]
    config = official_config(name)
    state_dict = {key: torch.empty(shape, device="meta") for key, shape in entry["state_dict"].items()}
    converted = convert_original_state_dict(state_dict, config)
    derived = {key for key in state_dict if focal_hf.original.rename_original_key(key) is None}
    assert len(converted) == len(state_dict) - len(derived)  # every parameter used, none left over
    assert sum(tensor.numel() for tensor in converted.values()) == entry["num_parameters"]
    with torch.device("meta"):
        model = focal_hf.FocalForImageClassification(config)
    assert sum(p.numel() for p in model.parameters()) == entry["num_parameters"]


def test_official_names():
    assert sorted(OFFICIAL_MODELS) == sorted(OFFICIAL)
    tiny = official_config("focal-fast-tiny")
    assert tiny.attention_type == "focal_fast" and tiny.use_conv_embed and tiny.num_labels == 1000
    assert official_config("focal-base").embed_dim == 128
    with pytest.raises(ValueError, match="focal-tiny"):
        official_config("focal-huge")


def test_checkpoint_wrapped_or_raw_and_buffers_recomputed():
    raw = torch.load(FIXTURES / "v2_useconv_224.pth", weights_only=True)
    config = focal_hf.config_from_original(FIXTURES / "v2_useconv_224.yaml")
    wrapped = convert_original_state_dict({"model": raw}, config)
    direct = convert_original_state_dict(raw, config)
    assert wrapped.keys() == direct.keys()
    assert not any("topk" in key or "index" in key for key in direct)
    # the nearest-token tables we compute are the ones the official code saved (same tokens, same order)
    for stage in range(4):
        geometry = config.block_geometry(stage, 0)
        height, width = config.stage_grid(stage)
        key_index = focal_fast_key_layout(height, width, geometry.window_size, 2, 128, torch.device("cpu")).key_index
        saved = [raw[f"layers.{stage}.blocks.0.attn.topk_cloest_indice_{level}"] for level in range(2)]
        # our key source lists the fine tokens window by window, then the pooled tokens
        window_size = geometry.window_size
        saved[0] = window_order(saved[0] // width, saved[0] % width, window_size, -(-width // window_size))
        saved[1] = saved[1] + height * width
        saved = torch.cat(saved, dim=1)
        torch.testing.assert_close(key_index[:, : saved.shape[1]], saved, rtol=0, atol=0)  # then alignment padding


def test_training_checkpoints_load_with_the_config_saved_in_them(tmp_path, monkeypatch):
    path = official_training_checkpoint("v2_shift_max_64", tmp_path)
    monkeypatch.setitem(sys.modules, "yacs", None)  # read as data: importing yacs would now fail
    monkeypatch.setitem(sys.modules, "yacs.config", None)
    model = load_original_checkpoint(path)  # no YAML: the config saved in the checkpoint
    expected_config = focal_hf.config_from_original(FIXTURES / "v2_shift_max_64.yaml")
    assert model.config.to_dict() == expected_config.to_dict()
    io = load_file(FIXTURES / "v2_shift_max_64.io.safetensors")
    with torch.no_grad():
        logits = model(io["pixel_values"]).logits
    torch.testing.assert_close(logits, io["logits"], atol=TOLERANCE, rtol=0)
    with_yaml = load_original_checkpoint(path, FIXTURES / "v2_shift_max_64.yaml")  # or with its YAML
    assert all(torch.equal(a, b) for a, b in zip(with_yaml.state_dict().values(), model.state_dict().values()))
    # released checkpoints hold only weights: no config to fall back on
    with pytest.raises(ValueError, match=r"holds no official config .* give the official YAML config"):
        load_original_checkpoint(FIXTURES / "v1_fc_224.pth")


def test_conversion_errors_name_the_keys():
    raw = torch.load(FIXTURES / "v1_fc_224.pth", weights_only=True)
    config = focal_hf.config_from_original(FIXTURES / "v1_fc_224.yaml")
    missing = dict(raw)
    del missing["layers.1.blocks.0.attn.qkv.weight"]
    with pytest.raises(ValueError, match=r"missing keys.*layers\.1\.blocks\.0\.attention\.qkv\.weight"):
        convert_original_state_dict(missing, config)
    unexpected = {**raw, "layers.9.blocks.0.attn.qkv.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"unexpected keys.*layers\.9\.blocks\.0\.attn\.qkv\.weight"):
        convert_original_state_dict(unexpected, config)
    misshaped = {**raw, "head.weight": torch.zeros(3, 3)}
    with pytest.raises(ValueError, match=r"mis-shaped keys.*head\.weight: checkpoint \(3, 3\)"):
        convert_original_state_dict(misshaped, config)
    other_config = focal_hf.config_from_original(FIXTURES / "v1_useconv_224.yaml")
    with pytest.raises(ValueError, match="does not match the config"):
        convert_original_state_dict(raw, other_config)


def test_non_checkpoint_files_are_rejected(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        load_original_checkpoint(tmp_path / "junk.pth", FIXTURES / "v1_fc_224.yaml")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="not a state dict"):
        load_original_checkpoint(tmp_path / "list.pth", FIXTURES / "v1_fc_224.yaml")
