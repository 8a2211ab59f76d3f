import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FIXTURES = Path(__file__).parent / "fixtures"
PARITY_CASES = ["v1_fc_224", "v1_useconv_224", "v2_useconv_224", "v1_shift_mean_64", "v1_shift_conv_80"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_config(**overrides):
    """A small, fast Focal model (16 channels, one block per stage) exercising pooling and expansion."""
    from focal_hf import FocalConfig

    kwargs = dict(
        image_size=64,
        embed_dim=16,
        depths=[1, 1, 2, 1],
        num_heads=[1, 2, 2, 4],
        window_size=4,
        focal_levels=[2, 2, 2, 2],
        focal_windows=[3, 3, 3, 1],
        expand_sizes=[2, 2, 2, 2],
        num_labels=5,
        drop_path_rate=0.0,
    )
    kwargs.update(overrides)
    return FocalConfig(**kwargs)
