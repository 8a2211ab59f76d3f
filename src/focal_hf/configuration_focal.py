# Copyright 2026 The focal-hf authors. Licensed under the Apache License, Version 2.0.
"""Focal Transformer model configuration."""

from __future__ import annotations

from .requirements import check_requirements  # noqa: F401 (first: an old torch or transformers is named here)

# isort: split
import functools
import math
from dataclasses import dataclass

from huggingface_hub.dataclasses import strict, type_validator
from transformers import PreTrainedConfig
from transformers.backbone_utils import BackboneConfigMixin

ATTENTION_TYPES = ("focal", "focal_fast")
POOL_METHODS = ("fc", "conv", "mean", "max", "none")
EXPAND_LAYERS = ("all", "even", "odd")


@functools.cache
def field_types() -> dict[str, object]:
    """`FocalConfig`'s own fields and their types (its annotations, which are strings here, evaluated)."""
    return {name: eval(hint, globals()) for name, hint in FocalConfig.__annotations__.items()}  # noqa: S307


def field_type_error(name: str, value, label: str | None = None) -> str | None:
    """Why `value` cannot be `FocalConfig` field `name` (shown as `label`), or `None` if it can."""
    expected = field_types()[name]
    try:
        type_validator(name, value, expected)
    except TypeError:
        shown = getattr(expected, "__name__", None) or str(expected).replace("typing.", "")
        return f"`{label or name}` must be {shown}; got {value!r} ({type(value).__name__})."
    return None


@dataclass(frozen=True)
class FocalBlockGeometry:
    """What one block of one stage looks like at `config.image_size`.

    The official code fixes these at construction from the configured image size: a stage whose grid is not larger
    than the window shrinks its window to the grid's smaller side and then neither shifts nor expands.
    """

    window_size: int
    shift_size: int
    expand_size: int
    pool_method: str
    focal_level: int
    focal_window: int

    @property
    def num_pooled_levels(self) -> int:
        """Number of coarse (pooled) levels this block attends, besides its fine-grained window."""
        return self.focal_level - 1 if self.pool_method != "none" and self.focal_level > 1 else 0

    @property
    def has_neighbors(self) -> bool:
        """Whether the block attends the fine-grained tokens around its window (the "expanded" window)."""
        return self.expand_size > 0 and self.focal_level > 0


@strict
class FocalConfig(BackboneConfigMixin, PreTrainedConfig):
    r"""
    Configuration of a Focal Transformer ([Yang et al., 2021](https://huggingface.co/papers/2107.00641)). The
    defaults give Focal-T (`focal-tiny`) of the official release; `focal_hf.official_config(name)` gives every
    official architecture and `focal_hf.config_from_original(yaml)` reads the official YAML schema.

    Args:
        image_size (`int` or `list[int]`, *optional*, defaults to 224):
            The image size the model is built for (`DATA.IMG_SIZE`). It fixes each stage's window geometry and the
            size of the absolute position embedding; the model runs at other sizes too (see the README).
        patch_size (`int`, *optional*, defaults to 4):
            Patch size of the stem (`PATCH_SIZE`). Ignored by the convolutional stem, which is always a 7x7,
            stride-4 convolution as in the official code.
        num_channels (`int`, *optional*, defaults to 3):
            Number of input channels (`IN_CHANS`).
        embed_dim (`int`, *optional*, defaults to 96):
            Width of the first stage (`EMBED_DIM`); each later stage doubles it.
        depths (`list[int]`, *optional*, defaults to `[2, 2, 6, 2]`):
            Number of blocks in each stage (`DEPTHS`).
        num_heads (`list[int]`, *optional*, defaults to `[3, 6, 12, 24]`):
            Number of attention heads in each stage (`NUM_HEADS`); must divide the stage's width.
        window_size (`int`, *optional*, defaults to 7):
            Side of the local attention window (`WINDOW_SIZE`).
        mlp_ratio (`float`, *optional*, defaults to 4.0):
            Ratio of the MLP's hidden width to the block's width (`MLP_RATIO`).
        qkv_bias (`bool`, *optional*, defaults to `True`):
            Whether the query/key/value projection has a bias (`QKV_BIAS`).
        qk_scale (`float`, *optional*):
            Scale of the attention logits; `None` means `head_dim ** -0.5` (`QK_SCALE`).
        hidden_dropout_prob (`float`, *optional*, defaults to 0.0):
            Dropout after the embeddings, the attention projection and the MLP (`MODEL.DROP_RATE`).
        attention_probs_dropout_prob (`float`, *optional*, defaults to 0.0):
            Dropout on the attention probabilities.
        drop_path_rate (`float`, *optional*, defaults to 0.1):
            Stochastic depth rate, increased linearly over all blocks (`MODEL.DROP_PATH_RATE`).
        hidden_act (`str`, *optional*, defaults to `"gelu"`):
            Activation of the MLP.
        use_absolute_embeddings (`bool`, *optional*, defaults to `False`):
            Whether to add a learned absolute position embedding after the stem (`APE`). At other input sizes it
            is resized bicubically.
        patch_norm (`bool`, *optional*, defaults to `True`):
            Whether the stem normalises its output with a LayerNorm (`PATCH_NORM`). Downsampling layers always do.
        use_shift (`bool`, *optional*, defaults to `False`):
            Whether every second block shifts its windows by half a window as in Swin (`USE_SHIFT`).
        focal_stages (`list[int]`, *optional*, defaults to `[0, 1, 2, 3]`):
            Stages (0-based) that attend pooled coarse-grained windows (`FOCAL_STAGES`); the others use
            `focal_pool="none"`.
        focal_levels (`list[int]`, *optional*, defaults to `[2, 2, 2, 2]`):
            Focal levels per stage (`FOCAL_LEVELS`): level 1 is the fine-grained window with its expanded
            surroundings; each further level adds pooled windows, the level `k` one pooled over sub-windows of
            `window_size // 2**(k-2)` tokens. 0 disables the expanded surroundings too.
        focal_windows (`list[int]`, *optional*, defaults to `[7, 5, 3, 1]`):
            Per stage, how many pooled windows (per side, odd) each window attends at the first pooled level
            (`FOCAL_WINDOWS`).
        focal_pool (`str`, *optional*, defaults to `"fc"`):
            How a window is pooled into one token (`FOCAL_POOL`): `"fc"` (a learned linear weighting of its
            tokens, shared by the channels), `"conv"` (a learned depth-wise convolution), `"mean"`, `"max"`, or
            `"none"` (no coarse levels).
        expand_sizes (`list[int]`, *optional*, defaults to `[3, 3, 3, 3]`):
            Per stage, how many tokens around each window (per side, at most `window_size`) the fine-grained level
            also attends (`EXPAND_SIZES`). Taken with `torch.roll` as in the official code, so at the image
            border they wrap around to the opposite side.
        expand_layer (`str`, *optional*, defaults to `"all"`):
            Which blocks of a stage expand their window (`EXPAND_LAYER`): `"all"`, `"even"` (blocks 1, 3, ... by
            0-based index, i.e. the official code disables expansion on even indices) or `"odd"`.
        use_conv_embed (`bool`, *optional*, defaults to `False`):
            Whether the stem and the downsampling layers are overlapping convolutions (7x7 stride 4 and 3x3
            stride 2) instead of non-overlapping patch projections (`USE_CONV_EMBED`).
        use_layerscale (`bool`, *optional*, defaults to `False`):
            Whether each residual branch is scaled by a learned per-channel factor (`USE_LAYERSCALE`).
        layerscale_value (`float`, *optional*, defaults to 1e-4):
            Initial value of the layer-scale factors.
        use_pre_norm (`bool`, *optional*, defaults to `False`):
            Whether the downsampling layers normalise their input with a one-group GroupNorm (`USE_PRE_NORM`). As in
            the official code, the stem never does.
        attention_type (`str`, *optional*, defaults to `"focal"`):
            `"focal"`: the focal self-attention of the official `focal` model (`MODEL.TYPE: focal`): each window
            attends its own tokens, its expanded surroundings and pooled neighbourhoods, with relative position
            bias tables. `"focal_fast"`: the Focal-fast attention of the official `focalv2` model
            (`MODEL.TYPE: focalv2`): at each focal level each window attends the `focal_topk` tokens nearest to
            its centre (all fine-grained tokens at level 1, the pooled windows at the next), with a position bias
            computed by a small MLP from the relative coordinates; `expand_sizes` play no role there.
        focal_topk (`int`, *optional*, defaults to 128):
            For `attention_type="focal_fast"`: how many nearest tokens each window attends per focal level
            (`FOCAL_TOPK`); capped at the number of tokens of that level's map.
        layer_norm_eps (`float`, *optional*, defaults to 1e-5):
            Epsilon of the LayerNorms.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the truncated normal initialisation of linear layers and bias tables.
        out_features (`list[str]`, *optional*):
            For `FocalBackbone`: which of `["stem", "stage1", ..., "stageN"]` to output. Defaults to the last stage.
        out_indices (`list[int]`, *optional*):
            For `FocalBackbone`: the same as indices into `stage_names`.

    Example:

    ```python
    >>> from focal_hf import FocalConfig, FocalModel

    >>> configuration = FocalConfig()  # Focal-T
    >>> model = FocalModel(configuration)
    ```"""

    model_type = "focal"

    attribute_map = {
        "num_attention_heads": "num_heads",
        "num_hidden_layers": "num_layers",
    }

    image_size: int | list[int] | tuple[int, int] = 224
    patch_size: int = 4
    num_channels: int = 3
    embed_dim: int = 96
    depths: list[int] | tuple[int, ...] = (2, 2, 6, 2)
    num_heads: list[int] | tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float | int = 4.0
    qkv_bias: bool = True
    qk_scale: float | int | None = None
    hidden_dropout_prob: float | int = 0.0
    attention_probs_dropout_prob: float | int = 0.0
    drop_path_rate: float | int = 0.1
    hidden_act: str = "gelu"
    use_absolute_embeddings: bool = False
    patch_norm: bool = True
    use_shift: bool = False
    focal_stages: list[int] | tuple[int, ...] = (0, 1, 2, 3)
    focal_levels: list[int] | tuple[int, ...] = (2, 2, 2, 2)
    focal_windows: list[int] | tuple[int, ...] = (7, 5, 3, 1)
    focal_pool: str = "fc"
    expand_sizes: list[int] | tuple[int, ...] = (3, 3, 3, 3)
    expand_layer: str = "all"
    use_conv_embed: bool = False
    use_layerscale: bool = False
    layerscale_value: float | int = 1e-4
    use_pre_norm: bool = False
    attention_type: str = "focal"
    focal_topk: int = 128
    layer_norm_eps: float | int = 1e-5
    initializer_range: float | int = 0.02
    _out_features: list[str] | None = None
    _out_indices: list[int] | None = None

    def __post_init__(self, **kwargs):
        self.validate_field_types()
        for name in ("depths", "num_heads", "focal_stages", "focal_levels", "focal_windows", "expand_sizes"):
            setattr(self, name, list(getattr(self, name)))
        if not isinstance(self.image_size, int):
            self.image_size = list(self.image_size)
        self.num_layers = len(self.depths)
        # width of the last stage: the size of `pooler_output` (and what VisionEncoderDecoderModel reads)
        self.hidden_size = int(self.embed_dim * 2 ** (len(self.depths) - 1))
        self.stage_names = ["stem"] + [f"stage{idx}" for idx in range(1, len(self.depths) + 1)]
        self.set_output_features_output_indices(
            out_indices=kwargs.pop("out_indices", None), out_features=kwargs.pop("out_features", None)
        )
        # a plain ValueError at construction (the @strict validators re-run it, wrapped, on `validate()`)
        self.validate_architecture()
        super().__post_init__(**kwargs)

    # ------------------------------------------------------------------ geometry
    @property
    def image_size_2d(self) -> tuple[int, int]:
        """`image_size` as `(height, width)`."""
        if isinstance(self.image_size, int):
            return (self.image_size, self.image_size)
        return tuple(self.image_size)

    @property
    def total_stride(self) -> int:
        """Pixels per token of the last stage: the smallest input side the model accepts."""
        return self.patch_size * 2 ** (len(self.depths) - 1)

    def stage_grid(self, stage: int) -> tuple[int, int]:
        """Token grid `(height, width)` of `stage` (0-based) at `image_size`, computed as the official code does."""
        height, width = self.image_size_2d
        return (height // self.patch_size // 2**stage, width // self.patch_size // 2**stage)

    def block_geometry(self, stage: int, block: int) -> FocalBlockGeometry:
        """Window, shift, expansion and focal settings of one block at `image_size`, as the official code fixes them."""
        window_size = self.window_size
        shift_size = window_size // 2 if self.use_shift and block % 2 == 1 else 0
        skipped_parity = {"all": None, "even": 0, "odd": 1}[self.expand_layer]
        expand_size = 0 if block % 2 == skipped_parity else self.expand_sizes[stage]
        grid = self.stage_grid(stage)
        if min(grid) <= window_size:
            window_size, shift_size, expand_size = min(grid), 0, 0
        return FocalBlockGeometry(
            window_size=window_size,
            shift_size=shift_size,
            expand_size=expand_size,
            pool_method=self.focal_pool if stage in self.focal_stages else "none",
            focal_level=self.focal_levels[stage],
            focal_window=self.focal_windows[stage],
        )

    # ---------------------------------------------------------------- validation
    def validate_field_types(self):
        """Part of `@strict`-powered validation: each field's value has its annotated type (an `int` field takes no
        `float`, `str` or `bool`). `@strict` cannot check them itself here: its annotations are strings."""
        for name in field_types():
            error = field_type_error(name, getattr(self, name))
            if error:
                raise ValueError(error)

    def validate_architecture(self):
        """Part of `@strict`-powered validation: reject settings the architecture cannot be built with."""
        self.validate_field_types()  # first: the checks below compare numbers
        num_stages = len(self.depths)
        if num_stages == 0 or any(d < 1 for d in self.depths):
            raise ValueError(f"`depths` must list at least one stage, each with >= 1 block; got {self.depths}.")
        for name in ("num_heads", "focal_levels", "focal_windows", "expand_sizes"):
            value = getattr(self, name)
            if len(value) != num_stages:
                raise ValueError(
                    f"`{name}` must have one entry per stage ({num_stages}, the length of `depths`); got {value}."
                )
        height, width = self.image_size_2d
        if min(height, width, self.patch_size, self.num_channels, self.embed_dim, self.window_size) < 1:
            raise ValueError("`image_size`, `patch_size`, `num_channels`, `embed_dim` and `window_size` must be >= 1.")
        if min(height, width) < self.total_stride:
            raise ValueError(
                f"`image_size` {self.image_size_2d} is smaller than the model's total stride of {self.total_stride} "
                f"pixels (patch_size * 2 ** (stages - 1))."
            )
        for stage, heads in enumerate(self.num_heads):
            dim = self.embed_dim * 2**stage
            if heads < 1 or dim % heads != 0:
                raise ValueError(f"Stage {stage} has width {dim}, which `num_heads[{stage}]`={heads} does not divide.")
        if self.focal_pool not in POOL_METHODS:
            raise ValueError(f"`focal_pool` must be one of {POOL_METHODS}; got {self.focal_pool!r}.")
        if self.attention_type not in ATTENTION_TYPES:
            raise ValueError(f"`attention_type` must be one of {ATTENTION_TYPES}; got {self.attention_type!r}.")
        if self.expand_layer not in EXPAND_LAYERS:
            raise ValueError(f"`expand_layer` must be one of {EXPAND_LAYERS}; got {self.expand_layer!r}.")
        if any(not 0 <= s < num_stages for s in self.focal_stages):
            raise ValueError(f"`focal_stages` must be stage indices in [0, {num_stages}); got {self.focal_stages}.")
        if any(level < 0 for level in self.focal_levels) or any(e < 0 for e in self.expand_sizes):
            raise ValueError("`focal_levels` and `expand_sizes` must be >= 0.")
        if not self.mlp_ratio > 0:
            raise ValueError(f"`mlp_ratio` must be > 0; got {self.mlp_ratio}.")
        if not 0 <= self.drop_path_rate < 1 or not 0 <= self.hidden_dropout_prob < 1:
            raise ValueError("`drop_path_rate` and `hidden_dropout_prob` must be in [0, 1).")
        if not 0 <= self.attention_probs_dropout_prob < 1:
            raise ValueError("`attention_probs_dropout_prob` must be in [0, 1).")
        if self.attention_type == "focal_fast":
            self._validate_focal_fast()
        for stage in range(num_stages):
            for block in range(min(self.depths[stage], 2)):
                geometry = self.block_geometry(stage, block)
                if geometry.expand_size > geometry.window_size:
                    raise ValueError(
                        f"`expand_sizes[{stage}]`={geometry.expand_size} is larger than the window "
                        f"({geometry.window_size}); it can be at most the window size."
                    )
                if geometry.num_pooled_levels and geometry.focal_window % 2 == 0:
                    raise ValueError(
                        f"`focal_windows[{stage}]`={geometry.focal_window} must be odd: pooled windows are taken "
                        f"symmetrically around each window."
                    )
                if geometry.num_pooled_levels and geometry.window_size // 2 ** (geometry.num_pooled_levels - 1) < 1:
                    raise ValueError(
                        f"Stage {stage} pools windows of {geometry.window_size} tokens over "
                        f"{geometry.num_pooled_levels} levels, halving each time: too many `focal_levels` "
                        f"({self.focal_levels[stage]}) for that window."
                    )

    def _validate_focal_fast(self):
        if self.focal_topk < 1:
            raise ValueError(f"`focal_topk` must be >= 1; got {self.focal_topk}.")
        for stage, level in enumerate(self.focal_levels):
            if level < 1:
                raise ValueError(f"Focal-fast attention needs `focal_levels[{stage}]` >= 1; got {level}.")
            if level > 1 and self.block_geometry(stage, 0).pool_method == "none":
                raise ValueError(
                    f"Focal-fast attention with `focal_levels[{stage}]`={level} needs pooled windows in stage "
                    f"{stage}: set `focal_pool` other than 'none' and list the stage in `focal_stages`."
                )


def pooled_window_size(window_size: int, level: int) -> int:
    """Side of the sub-windows pooled into one token at pooled level `level` (0-based)."""
    return math.floor(window_size / 2**level)


__all__ = ["FocalConfig"]
