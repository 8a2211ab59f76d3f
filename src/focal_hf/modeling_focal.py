# Copyright 2026 The focal-hf authors. Licensed under the Apache License, Version 2.0.
"""PyTorch Focal Transformer (Yang et al., "Focal Self-attention for Local-Global Interactions in Vision Transformers").

Each block attends, from every window of `window_size**2` query tokens,
1. the window's own tokens (fine-grained, with a relative position bias),
2. the fine-grained tokens around the window, up to `expand_size` away ("expanded" window), and
3. for each further focal level, the tokens of a map where sub-windows are pooled into one token, in a
   neighbourhood of windows around it (coarse-grained).
All keys of a window are gathered with one precomputed index map per input size from one projection of the tokens
(the fine ones window by window, then the pooled ones), and the position biases and masks are combined into one
additive attention bias, so the attention itself is a plain (eager or SDPA) call. The keys are fewer than the
official code's at identical outputs: a surrounding token that two shifted windows both reach is one key with the
log-sum-exp of both biases, and pooled tokens outside the map (official: masked zero tokens) are left out. On CPU the
SDPA path runs the custom op `cpu_gathered_attention`: the fused kernel one image at a time, and a backward pass
that recomputes rather than stores the gathered keys and attention matrices.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.backbone_utils import BackboneMixin, filter_output_hidden_states
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BackboneOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs, auto_docstring
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_focal import FocalBlockGeometry, FocalConfig, pooled_window_size

# The official code masks with -100 (not -inf): across shifted-window regions and on pooled tokens outside the map.
MASK_VALUE = -100.0
# Without autograd on CPU, a block processes as many images at a time as keep its MLP's hidden activations within
# this many bytes.
CPU_CHUNK_BYTES = 8 * 2**20
# Keys per window are padded (with masked keys) to a multiple of this: attention kernels then run without vector tails.
KEY_ALIGNMENT = 16


# ---------------------------------------------------------------------------------------------------- outputs
@dataclass
class FocalEncoderOutput(ModelOutput):
    r"""
    reshaped_hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned when `output_hidden_states=True`):
        The embeddings' output and each stage's output as `(batch_size, channels, height, width)` maps.
    """

    last_hidden_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    reshaped_hidden_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class FocalModelOutput(ModelOutput):
    r"""
    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, num_tokens, hidden_size)`):
        Final-LayerNorm'd tokens of the last stage, row-major.
    pooler_output (`torch.FloatTensor` of shape `(batch_size, hidden_size)`, *optional*):
        Average of `last_hidden_state` over the tokens.
    hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned when `output_hidden_states=True`):
        The embeddings' output and each stage's output (after its downsampling), `(batch_size, tokens, channels)`.
    attentions (`tuple(torch.FloatTensor)`, *optional*, returned when `output_attentions=True`, eager attention):
        For each stage, the attention probabilities of its last block,
        `(batch_size * num_windows, num_heads, window_size**2, num_keys)`, over the keys of its layout (each distinct
        token once; padding keys have probability 0).
    reshaped_hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned when `output_hidden_states=True`):
        `hidden_states` as `(batch_size, channels, height, width)` maps.
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    reshaped_hidden_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class FocalImageClassifierOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `(1,)`, *optional*, returned when `labels` is provided):
        Classification (or regression if `config.num_labels==1`) loss.
    logits (`torch.FloatTensor` of shape `(batch_size, config.num_labels)`):
        Classification (or regression if `config.num_labels==1`) scores (before SoftMax).
    hidden_states, attentions, reshaped_hidden_states:
        As in [`FocalModelOutput`].
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    reshaped_hidden_states: tuple[torch.FloatTensor, ...] | None = None


# ------------------------------------------------------------------------------------------ window geometry
def _grid(height: int, width: int) -> torch.Tensor:
    """Row-major coordinates `(2, height * width)` of a `height x width` grid."""
    return torch.stack(torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")).flatten(1)


def window_order(rows: torch.Tensor, cols: torch.Tensor, window_size: int, grid_w: int) -> torch.Tensor:
    """Position of the tokens at (`rows`, `cols`) of a map of `grid_w` windows per row, when its tokens are listed
    window by window (windows row-major, tokens row-major within each): the order of the attention's key source."""
    windows = (rows // window_size) * grid_w + cols // window_size
    return windows * window_size**2 + (rows % window_size) * window_size + cols % window_size


def relative_position_index(query_size: int, key_size: int) -> torch.Tensor:
    """Index `(query_size**2, key_size**2)` into a `((query_size + key_size - 1) ** 2)` bias table, for a
    `query_size` window and a `key_size` grid of keys both anchored at their top-left corners."""
    relative = (
        _grid(query_size, query_size)[:, :, None] - _grid(key_size, key_size)[:, None, :] + (key_size - 1)
    )  # 2, Nq, Nk, both in [0, q + k - 2]
    return relative[0] * (query_size + key_size - 1) + relative[1]


def neighbor_offsets(window_size: int, expand_size: int) -> torch.Tensor:
    """Offsets `(num_neighbors, 2)` from a window's top-left token to the tokens around it that a window with
    `expand_size` attends, in the official order: the four windows shifted diagonally by `expand_size`
    (towards bottom-right, bottom-left, top-right, top-left), each without the part inside the window."""
    rows, cols = torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij")
    offsets = []
    for d_row, d_col in ((1, 1), (1, -1), (-1, 1), (-1, -1)):
        inside_rows = rows < window_size - expand_size if d_row > 0 else rows >= expand_size
        inside_cols = cols < window_size - expand_size if d_col > 0 else cols >= expand_size
        outside = ~(inside_rows & inside_cols)
        offsets.append(torch.stack((rows + d_row * expand_size, cols + d_col * expand_size), -1)[outside])
    return torch.cat(offsets)


def pooled_neighborhood(focal_window: int, level: int) -> tuple[int, torch.Tensor]:
    """Size and `(num_keys, 2)` offsets of the neighbourhood of pooled tokens a window attends at pooled level
    `level`, relative to the window's own position on that level's map (official unfold, valid part only)."""
    stride = 2**level
    kernel = 2 * (focal_window // 2) + 2 * stride - 1
    first = stride - 1  # the official code keeps the kernel's last `focal_window + stride - 1` rows/cols
    index = torch.arange(first, kernel) - kernel // 2
    rows, cols = torch.meshgrid(index, index, indexing="ij")
    return kernel - first, torch.stack((rows, cols), -1).flatten(0, 1)


def shift_window_mask(height: int, width: int, window_size: int, shift_size: int) -> torch.Tensor:
    """Swin's shifted-window mask `(num_windows, window_size**2, window_size**2)`: 0 within a region, -100 across."""

    def regions(size):
        index = torch.arange(size)
        return (index >= size - window_size).long() + (index >= size - shift_size).long()

    labels = regions(height)[:, None] * 3 + regions(width)[None, :]
    labels = labels.view(height // window_size, window_size, width // window_size, window_size)
    labels = labels.transpose(1, 2).reshape(-1, window_size * window_size)  # num_windows, window_size**2
    return (labels[:, None, :] != labels[:, :, None]).float() * MASK_VALUE


class FocalKeyLayout(nn.Module):
    """Where each window's keys come from, for one input size: non-persistent buffers, so the layout moves with
    the model (`.to(device)`) and `torch.compile` sees constants. Each attention holds the layout of the configured
    image size; other sizes come from `cached_key_layout`.

    key_index (`(num_windows, num_keys)`): index into the attention's tokens, the padded fine-grained map window by
        window (`window_order`) followed by each pooled map. `num_keys` is padded to a multiple of `KEY_ALIGNMENT`
        with token 0, which the attention bias masks out (`num_padding_keys`).
    The other buffers say how to build each key's bias; they depend on the attention (see its layout builder).
    """

    def __init__(self, builder: Callable, *args):
        super().__init__()
        self.builder, self.args = builder, args
        # real tensors even when the model is built on the meta device, and usable by autograd even when first needed
        # under `torch.inference_mode()`
        with torch.device("cpu"), torch.inference_mode(False):
            self.num_padding_keys = -builder(*args)["key_index"].shape[1] % KEY_ALIGNMENT
            tensors = self._build()
        self.names = [name for name, tensor in tensors.items() if tensor is not None]
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor, persistent=False)

    def _build(self) -> dict[str, torch.Tensor | None]:
        tensors = dict(self.builder(*self.args))
        tensors["key_index"] = F.pad(tensors["key_index"], (0, self.num_padding_keys))
        return tensors

    @property
    def distinct_coords(self) -> list[torch.Tensor]:
        return [getattr(self, name) for name in self.names if name.startswith("distinct_coords_")]

    def pad_bias(self, bias: torch.Tensor) -> torch.Tensor:
        """`bias` `(..., num_real_keys)` with the padding keys masked out: `(..., num_keys)`."""
        return F.pad(bias, (0, self.num_padding_keys), value=float("-inf")) if self.num_padding_keys else bias

    def reset(self) -> None:
        """Recompute the buffers (`from_pretrained` builds models on the meta device)."""
        tensors = self._build()
        for name in self.names:
            init.copy_(getattr(self, name), tensors[name])


@functools.lru_cache(maxsize=256)
def cached_key_layout(builder: Callable, args: tuple, device: torch.device) -> FocalKeyLayout:
    """The `FocalKeyLayout` of `builder(*args)` on `device`, built once per input size and kept."""
    with torch.inference_mode(False):  # it outlives the current mode: normal tensors
        return FocalKeyLayout(builder, *args).to(device)


def merge_duplicate_offsets(offsets: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Offsets `(n, 2)` that reach the same token of a `height x width` map once `torch.roll` wraps them around,
    grouped: the distinct offsets `(d, 2)` and, for each, the indices `(d, m)` of the offsets it stands for (`n` pads
    groups smaller than the largest)."""
    codes = (offsets[:, 0] % height) * width + offsets[:, 1] % width
    _, group = torch.unique(codes, return_inverse=True)
    counts = torch.bincount(group)
    members = torch.full((len(counts), int(counts.max())), len(offsets))
    order = torch.argsort(group, stable=True)
    members[group[order], torch.arange(len(order)) - (counts.cumsum(0) - counts)[group[order]]] = order
    return offsets[members[:, 0]], members


@functools.lru_cache(maxsize=256)
def focal_key_layout(height: int, width: int, geometry: FocalBlockGeometry) -> dict[str, torch.Tensor | None]:
    """`FocalKeyLayout` tensors of a focal-attention block with `geometry` on a `height x width` map (padded to whole
    windows). Cached: blocks of one geometry share them.

    The official keys of a window, its "slots", are its own tokens, then its surrounding tokens (the parts of four
    diagonally shifted windows outside it, `torch.roll` wrapping around) and a neighbourhood of tokens on each pooled
    map (zero tokens masked with -100 outside the map). We attend the same thing with fewer keys:
    - a surrounding token that two shifted windows both reach is one key whose bias is the log-sum-exp of the two
      slots' biases (`exp(s + a) + exp(s + b) = exp(s + log(exp(a) + exp(b)))`);
    - pooled slots outside the map are dropped (the official weight of a masked zero token, `exp(-100)` relative,
      is below float precision); each window keeps its valid ones in official order, padded with masked keys to
      the largest count.

    key_index (`(num_windows, num_keys)`): the window's own tokens, the distinct surrounding tokens, its pooled tokens.
    fine_slots (`(num_own + num_distinct, m)`): the fine slots (own, then surrounding) each fine key stands for;
        `num_fine_slots` pads.
    pooled_slots (`(num_windows, num_pooled)`): the pooled slot (over all levels, official order) of each pooled key;
        `num_pooled_slots` for padding.
    key_mask (`(num_windows, window_size**2, num_keys)`): the shifted-window mask (-100 across regions) on the own
        tokens, or `None` without shift.
    """
    window_size = geometry.window_size
    window_area = window_size * window_size
    grid_h, grid_w = -(-height // window_size), -(-width // window_size)
    height, width = grid_h * window_size, grid_w * window_size
    window_rows, window_cols = _grid(grid_h, grid_w)  # position of each window on the window grid

    # fine level: own tokens (never merged: they carry the shift mask), then the distinct surrounding ones
    own = _grid(window_size, window_size).T
    fine_offsets, fine_slots = own, torch.arange(window_area)[:, None]
    if geometry.has_neighbors:
        offsets = neighbor_offsets(window_size, geometry.expand_size)
        neighbors, members = merge_duplicate_offsets(offsets, height, width)
        padding_slot = window_area + len(offsets)
        members = torch.where(members < len(offsets), members + window_area, padding_slot)
        fine_offsets = torch.cat((own, neighbors))
        fine_slots = torch.cat((F.pad(fine_slots, (0, members.shape[1] - 1), value=padding_slot), members))
    token_rows = (window_rows[:, None] * window_size + fine_offsets[None, :, 0]) % height
    token_cols = (window_cols[:, None] * window_size + fine_offsets[None, :, 1]) % width
    fine_index = window_order(token_rows, token_cols, window_size, grid_w)

    # pooled levels: a neighbourhood around the window on each pooled map; keep the valid tokens, in official order
    pooled_index, pooled_valid = [], []
    start = height * width
    for level in range(geometry.num_pooled_levels):
        stride, map_h, map_w = 2**level, grid_h * 2**level, grid_w * 2**level
        _, pooled_offsets = pooled_neighborhood(geometry.focal_window, level)
        pooled_rows = window_rows[:, None] * stride + pooled_offsets[None, :, 0]
        pooled_cols = window_cols[:, None] * stride + pooled_offsets[None, :, 1]
        pooled_valid.append((pooled_rows >= 0) & (pooled_rows < map_h) & (pooled_cols >= 0) & (pooled_cols < map_w))
        pooled_index.append(start + pooled_rows.clamp(0, map_h - 1) * map_w + pooled_cols.clamp(0, map_w - 1))
        start += map_h * map_w
    pooled_index = torch.cat(pooled_index, dim=1) if pooled_index else fine_index[:, :0]
    valid = torch.cat(pooled_valid, dim=1) if pooled_valid else pooled_index.bool()
    num_pooled = int(valid.sum(1).max())
    order = torch.argsort((~valid).byte(), dim=1, stable=True)[:, :num_pooled]  # valid slots first
    kept = valid.gather(1, order)
    pooled_slots = torch.where(kept, order, valid.shape[1])
    key_index = torch.cat((fine_index, torch.where(kept, pooled_index.gather(1, order), 0)), dim=1)

    key_mask = None
    if geometry.shift_size > 0:
        key_mask = torch.zeros(len(window_rows), window_area, key_index.shape[1])
        key_mask[:, :, :window_area] = shift_window_mask(height, width, window_size, geometry.shift_size)
    return {"key_index": key_index, "key_mask": key_mask, "fine_slots": fine_slots, "pooled_slots": pooled_slots}


def nearest_tokens(queries: torch.Tensor, keys: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query position `(2, num_queries)`, the `topk` nearest key positions `(2, num_keys)` (Euclidean, ties
    broken by `torch.topk` as in the official code): their indices `(num_queries, k)` and the query-minus-key
    coordinates `(num_queries, k, 2)`."""
    relative = queries[:, :, None] - keys[:, None, :]
    distances = torch.sqrt(relative[0].float() ** 2 + relative[1].float() ** 2)
    _, index = torch.topk(-distances, min(topk, keys.shape[1]), dim=1)
    return index, torch.gather(relative, 2, index[None].expand(2, -1, -1)).permute(1, 2, 0).float()


@functools.lru_cache(maxsize=256)
def focal_fast_key_layout(
    height: int, width: int, window_size: int, focal_level: int, topk: int
) -> dict[str, torch.Tensor]:
    """`FocalKeyLayout` tensors of a Focal-fast block on a `height x width` map (padded to whole windows): key_index
    `(num_windows, num_keys)`, coord_index `(num_windows, window_size**2, num_keys)` (which distinct query-to-key
    coordinate applies to each (window, query, key), counting through the levels in order) and
    `distinct_coords_{level}` `(num_distinct, 2)`.

    Level 0: the `topk` tokens of the map nearest to each window's centre. Level `l` >= 1: the `topk` windows
    nearest to the window on the window grid, read from pooled map `l` as the official code does (for `l` >= 2 it
    indexes that finer map with window-grid indices). Relative coordinates are in tokens (windows scaled by the
    window size) and are offset by each query's position in its window.
    """
    grid_h, grid_w = -(-height // window_size), -(-width // window_size)
    windows = _grid(grid_h, grid_w)
    in_window = _grid(window_size, window_size).T - window_size // 2  # query offsets from the window centre
    indices, coord_indices, distinct_coords = [], [], []
    start = grid_h * grid_w * window_size**2
    for level in range(focal_level):
        if level == 0:
            tokens = _grid(height, width)
            index, relative = nearest_tokens(windows * window_size + window_size // 2, tokens, topk)
            indices.append(window_order(tokens[0][index], tokens[1][index], window_size, grid_w))
        else:
            index, relative = nearest_tokens(windows, windows, topk)
            relative = relative * window_size
            indices.append(start + index)
            start += (grid_h * 2 ** (level - 1)) * (grid_w * 2 ** (level - 1))
        coords = relative[:, None, :, :].long() + in_window[None, :, None, :]  # num_windows, window_area, k, 2
        span = 2 * int(coords.abs().max()) + 1  # integer coordinates: number them on a span x span grid
        codes, which = torch.unique(
            (coords[..., 0] + span // 2) * span + coords[..., 1] + span // 2, return_inverse=True
        )
        coord_indices.append(which + sum(len(distinct) for distinct in distinct_coords))
        distinct_coords.append(torch.stack((codes // span - span // 2, codes % span - span // 2), dim=-1).float())
    tensors = {"key_index": torch.cat(indices, dim=1), "coord_index": torch.cat(coord_indices, dim=-1)}
    return tensors | {f"distinct_coords_{level}": coords for level, coords in enumerate(distinct_coords)}


# -------------------------------------------------------------------------------------------------- modules
class FocalDropPath(nn.Module):
    """Stochastic depth per sample on a residual branch; identity when `drop_prob` is 0 or in eval mode."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return hidden_states
        keep_prob = 1 - self.drop_prob
        shape = (hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)
        noise = torch.rand(shape, dtype=hidden_states.dtype, device=hidden_states.device)
        random_tensor = torch.floor(keep_prob + noise)
        return hidden_states.div(keep_prob) * random_tensor

    def extra_repr(self) -> str:
        return f"p={self.drop_prob}"


class FocalPatchEmbeddings(nn.Module):
    """The stem (`is_stem=True`) or a stage's downsampling layer:
    `(batch_size, in_channels, height, width)` -> `(batch_size, height' * width', out_channels)`, `(height', width')`.

    A non-overlapping `patch_size` (stem) or 2x2 (downsampling) projection, or with `use_conv_embed` an overlapping
    7x7/stride-4 (stem) or 3x3/stride-2 convolution; a LayerNorm after (the stem: with `patch_norm`) and, for
    downsampling with `use_pre_norm`, a one-group GroupNorm before.
    """

    def __init__(self, config: FocalConfig, in_channels: int, out_channels: int, is_stem: bool):
        super().__init__()
        if config.use_conv_embed:
            kernel_size, stride, padding = (7, 4, 2) if is_stem else (3, 2, 1)
        else:
            kernel_size = stride = config.patch_size if is_stem else 2
            padding = 0
        # the official stem never pre-normalises, whatever `use_pre_norm` says
        has_pre_norm = config.use_pre_norm and not is_stem
        self.pre_norm = nn.GroupNorm(1, in_channels, eps=config.layer_norm_eps) if has_pre_norm else None
        self.projection = nn.Conv2d(in_channels, out_channels, kernel_size=kernel_size, stride=stride, padding=padding)
        has_norm = config.patch_norm or not is_stem
        self.norm = nn.LayerNorm(out_channels, eps=config.layer_norm_eps) if has_norm else None

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        if self.pre_norm is not None:
            pixel_values = self.pre_norm(pixel_values)
        kernel_size, stride = self.projection.kernel_size[0], self.projection.stride[0]
        if kernel_size == stride:  # non-overlapping patches: one matrix product, no convolution weight reorder
            batch_size, channels, height, width = pixel_values.shape
            height, width = height // stride, width // stride
            patches = pixel_values[:, :, : height * stride, : width * stride]
            patches = patches.reshape(batch_size, channels, height, stride, width, stride).permute(0, 2, 4, 1, 3, 5)
            weight = self.projection.weight.view(self.projection.out_channels, -1)
            embeddings = F.linear(patches.reshape(batch_size, height * width, -1), weight, self.projection.bias)
        else:
            embeddings = self.projection(pixel_values)
            height, width = embeddings.shape[-2:]
            embeddings = embeddings.flatten(2).transpose(1, 2)
        if self.norm is not None:
            embeddings = self.norm(embeddings)
        return embeddings, (height, width)


class FocalEmbeddings(nn.Module):
    """Stem, optional absolute position embedding and dropout: pixels -> `(batch_size, tokens, embed_dim)`."""

    def __init__(self, config: FocalConfig):
        super().__init__()
        self.patch_embeddings = FocalPatchEmbeddings(config, config.num_channels, config.embed_dim, is_stem=True)
        self.grid_size = config.stage_grid(0)
        self.position_embeddings = (
            nn.Parameter(torch.zeros(1, self.grid_size[0] * self.grid_size[1], config.embed_dim))
            if config.use_absolute_embeddings
            else None
        )
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def interpolate_pos_encoding(self, height: int, width: int) -> torch.Tensor:
        """The absolute position embedding for a `height x width` token grid: as trained at the configured size,
        resized bicubically otherwise."""
        if (height, width) == self.grid_size:
            return self.position_embeddings
        dim = self.position_embeddings.shape[-1]
        grid = self.position_embeddings.reshape(1, *self.grid_size, dim).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=False)
        return grid.permute(0, 2, 3, 1).reshape(1, height * width, dim)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        embeddings, output_dimensions = self.patch_embeddings(pixel_values)
        if self.position_embeddings is not None:
            embeddings = embeddings + self.interpolate_pos_encoding(*output_dimensions)
        return self.dropout(embeddings), output_dimensions


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Unpack[TransformersKwargs],
):
    """Plain attention with an additive float bias, as the official code computes it."""
    attn_weights = torch.matmul(query * scaling, key.transpose(-2, -1))
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


def gather_key_values(
    key_value: torch.Tensor, key_index: torch.Tensor, num_heads: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each window's keys and values, in `key_index` order, from their source `(..., num_source_tokens, 2 * dim)`
    (one gather of whole rows): two `(batch * num_windows, num_heads, num_keys, head_dim)` views."""
    gathered = key_value.index_select(-2, key_index.flatten())
    head_dim = key_value.shape[-1] // (2 * num_heads)
    gathered = gathered.view(-1, key_index.shape[1], 2, num_heads, head_dim)
    return gathered.permute(2, 0, 3, 1, 4).unbind(0)


def split_qkv(qkv: torch.Tensor, key_index: torch.Tensor, window_area: int, num_heads: int):
    """Projected tokens `(..., num_tokens + num_pooled, 3 * dim)` (one image or a batch) -> the queries
    `(batch * num_windows, num_heads, window_area, head_dim)`, and each window's keys and values (gathered)."""
    dim = qkv.shape[-1] // 3
    query = qkv[..., : key_index.shape[0] * window_area, :dim].reshape(-1, window_area, num_heads, dim // num_heads)
    return query.transpose(1, 2), *gather_key_values(qkv[..., dim:], key_index, num_heads)


def _cpu_gathered_attention(
    qkv: torch.Tensor, bias: torch.Tensor, key_index: torch.Tensor, num_heads: int, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPA over gathered keys on CPU, one image at a time, with PyTorch's fused (flash) CPU kernel.

    qkv `(batch, num_tokens + num_pooled, 3 * dim)`: the projected tokens, the fine ones window by window; bias
    `(num_windows or 1, num_heads, window_area, num_keys)`; key_index `(num_windows, num_keys)` into the tokens ->
    the output `(batch * num_windows, window_area, num_heads, head_dim)` and its log-sum-exp (float32)
    `(batch * num_windows, num_heads, window_area)`.
    """
    num_windows, window_area = key_index.shape[0], bias.shape[2]
    head_dim = qkv.shape[-1] // (3 * num_heads)
    output = qkv.new_empty(len(qkv) * num_windows, window_area, num_heads, head_dim)
    logsumexp = qkv.new_empty(len(qkv) * num_windows, num_heads, window_area, dtype=torch.float32)
    for image, image_qkv in enumerate(qkv):
        rows = slice(image * num_windows, (image + 1) * num_windows)
        image_output, logsumexp[rows] = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            *split_qkv(image_qkv, key_index, window_area, num_heads),
            attn_mask=bias.expand(num_windows, -1, -1, -1),
            scale=scaling,
        )
        output[rows] = image_output.transpose(1, 2)
    return output, logsumexp


def _cpu_gathered_attention_backward(
    grad_output: torch.Tensor,
    qkv: torch.Tensor,
    bias: torch.Tensor,
    key_index: torch.Tensor,
    output: torch.Tensor,
    logsumexp: torch.Tensor,
    num_heads: int,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of `qkv` and `bias`, recomputing each image's gathered keys and attention matrix."""
    (num_windows, num_keys), window_area, dim = key_index.shape, bias.shape[2], qkv.shape[-1] // 3
    compute_dtype = torch.promote_types(qkv.dtype, torch.float32)  # low precision: recompute in float32
    grad_qkv = torch.empty_like(qkv)
    grad_qkv[:, num_windows * window_area :, :dim] = 0  # the pooled tokens' queries are not used
    grad_bias = torch.zeros_like(bias, dtype=compute_dtype)
    grad_rows = qkv.new_empty(num_windows, num_keys, 2, num_heads, dim // num_heads)
    grad_key_value = qkv.new_empty(qkv.shape[1], 2 * dim)  # contiguous: index_add_ into a strided view is 4x slower
    for image in range(len(qkv)):
        rows = slice(image * num_windows, (image + 1) * num_windows)
        query, keys, values = (
            tensor.to(compute_dtype).contiguous() for tensor in split_qkv(qkv[image], key_index, window_area, num_heads)
        )
        image_output, image_grad = (tensor[rows].transpose(1, 2).to(compute_dtype) for tensor in (output, grad_output))
        scores = torch.matmul(query, keys.transpose(-1, -2)).mul_(scaling).add_(bias)
        probs = scores.sub_(logsumexp[rows].unsqueeze(-1)).exp_()  # the forward's softmax
        grad_scores = torch.matmul(image_grad, values.transpose(-1, -2))
        grad_scores.sub_((image_grad * image_output).sum(-1, keepdim=True)).mul_(probs)
        grad_bias += grad_scores.sum(0, keepdim=True) if bias.shape[0] == 1 else grad_scores
        grad_query = torch.matmul(grad_scores, keys).mul_(scaling).transpose(1, 2)
        grad_qkv[image, : num_windows * window_area, :dim].view(grad_query.shape).copy_(grad_query)
        grad_rows[:, :, 0] = torch.matmul(grad_scores.transpose(-1, -2), query).mul_(scaling).transpose(1, 2)
        grad_rows[:, :, 1] = torch.matmul(probs.transpose(-1, -2), image_grad).transpose(1, 2)
        grad_key_value.zero_().index_add_(0, key_index.flatten(), grad_rows.view(num_windows * num_keys, -1))
        grad_qkv[image, :, dim:] = grad_key_value
    return grad_qkv, grad_bias.to(bias.dtype)


def _register_cpu_gathered_attention():
    """`cpu_gathered_attention(qkv, bias, key_index, num_heads, scaling) -> (output, logsumexp)` as a PyTorch custom
    op with its own backward pass. The forward runs the fused CPU kernel; the backward recomputes the gathered keys and
    attention matrices rather than storing them, and differentiates the bias: the fused CPU kernel gives no bias
    gradient, so autograd would fall back to the unfused path and keep every attention matrix and gathered key
    (1.4x Swin-T's training memory for Focal-T). As a custom op it is one opaque node for `torch.compile`: its
    gathers and loops are not re-generated as slower compiled kernels. Registered once per process (the same code
    may also be imported as Hub remote code)."""
    if hasattr(torch.ops.focal_transformer, "cpu_gathered_attention"):
        return torch.ops.focal_transformer.cpu_gathered_attention
    forward = torch.library.custom_op("focal_transformer::cpu_gathered_attention", mutates_args=())(
        _cpu_gathered_attention
    )
    backward = torch.library.custom_op("focal_transformer::cpu_gathered_attention_backward", mutates_args=())(
        _cpu_gathered_attention_backward
    )

    @forward.register_fake
    def _(qkv, bias, key_index, num_heads, scaling):
        rows, window_area = len(qkv) * key_index.shape[0], bias.shape[2]
        output = qkv.new_empty(rows, window_area, num_heads, qkv.shape[-1] // (3 * num_heads))
        return output, qkv.new_empty(rows, num_heads, window_area, dtype=torch.float32)

    @backward.register_fake
    def _(grad_output, qkv, bias, key_index, output, logsumexp, num_heads, scaling):
        return torch.empty_like(qkv), torch.empty_like(bias)

    def setup_context(ctx, inputs, output):
        qkv, bias, key_index, ctx.num_heads, ctx.scaling = inputs
        ctx.save_for_backward(qkv, bias, key_index, *output)

    def differentiate(ctx, grad_output, grad_logsumexp):
        grads = backward(grad_output, *ctx.saved_tensors, ctx.num_heads, ctx.scaling)
        return *grads, None, None, None

    forward.register_autograd(differentiate, setup_context=setup_context)
    return torch.ops.focal_transformer.cpu_gathered_attention


cpu_gathered_attention = _register_cpu_gathered_attention()


class FocalWindowPooling(nn.Module):
    """Pools the (padded, shifted) map into one token per sub-window for each coarse focal level:
    `(batch_size, height, width, channels)` -> per level `(batch_size, grid_h * 2**level, grid_w * 2**level, channels)`.

    Level `k` pools sub-windows of `window_size // 2**k` tokens on the map trimmed or zero-padded centrally to
    `2**k` sub-windows per window (official behaviour). `fc` is a linear weighting of a sub-window's tokens shared
    by all channels, `conv` a depth-wise convolution, `mean`/`max` have no weights.
    """

    def __init__(self, geometry: FocalBlockGeometry, dim: int):
        super().__init__()
        self.window_size = geometry.window_size
        self.pool_method = geometry.pool_method
        self.num_levels = geometry.num_pooled_levels
        sizes = [pooled_window_size(self.window_size, level) for level in range(self.num_levels)]
        if self.pool_method == "fc":
            self.pool_layers = nn.ModuleList(nn.Linear(size * size, 1) for size in sizes)
        elif self.pool_method == "conv":
            self.pool_layers = nn.ModuleList(nn.Conv2d(dim, dim, size, stride=size, groups=dim) for size in sizes)
        else:
            self.pool_layers = None

    @staticmethod
    def _center_fit(size: int, target: int) -> tuple[int, int]:
        """F.pad amounts that trim (negative) or zero-pad `size` to `target` centrally, the extra one at the end."""
        difference = target - size
        before = int(math.copysign(abs(difference) // 2, difference))
        return before, difference - before

    def pool_level(self, hidden_states: torch.Tensor, level: int) -> torch.Tensor:
        """`(batch_size, height, width, channels)` -> `(batch_size, grid_h * 2**level, grid_w * 2**level, channels)`."""
        size = pooled_window_size(self.window_size, level)
        batch_size, height, width, channels = hidden_states.shape
        target_h = height // self.window_size * 2**level * size
        target_w = width // self.window_size * 2**level * size
        if (target_h, target_w) != (height, width):
            padding = (0, 0, *self._center_fit(width, target_w), *self._center_fit(height, target_h))
            hidden_states = F.pad(hidden_states, padding)
        if self.pool_method == "fc":  # a weighted sum of each sub-window's tokens
            layer = self.pool_layers[level]
            sub_windows = hidden_states.view(batch_size, target_h // size, size, target_w // size, size, channels)
            return torch.einsum("bhiwjc,ij->bhwc", sub_windows, layer.weight.view(size, size)) + layer.bias
        channels_first = hidden_states.permute(0, 3, 1, 2)
        if self.pool_method == "mean":
            pooled = F.avg_pool2d(channels_first, size)
        elif self.pool_method == "max":
            pooled = F.max_pool2d(channels_first, size)
        else:
            pooled = self.pool_layers[level](channels_first)
        return pooled.permute(0, 2, 3, 1)

    def forward(self, hidden_states: torch.Tensor) -> list[torch.Tensor]:
        return [self.pool_level(hidden_states, level) for level in range(self.num_levels)]


class FocalAttentionBase(nn.Module):
    """What both focal attentions share: each window's queries attend keys gathered from the fine-grained and pooled
    maps by a cached `FocalKeyLayout`, with an additive bias; subclasses define the layout and the bias.

    Takes the padded, shifted map `(batch_size, height, width, dim)`, its pooled maps and the unpadded size; returns
    `(batch_size, height, width, dim)` and, for eager attention, the probabilities
    `(batch_size * num_windows, num_heads, window_size**2, num_keys)`.
    """

    def __init__(
        self, config: FocalConfig, dim: int, num_heads: int, geometry: FocalBlockGeometry, grid: tuple[int, int]
    ):
        super().__init__()
        self.config = config
        self.geometry = geometry
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scaling = config.qk_scale or self.head_dim**-0.5
        self.attention_dropout = config.attention_probs_dropout_prob
        self.is_causal = False
        self.qkv = nn.Linear(dim, dim * 3, bias=config.qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_dropout = nn.Dropout(config.hidden_dropout_prob)
        self.layout_size = grid
        builder, args = self.layout_arguments(*grid)
        self.layout = FocalKeyLayout(builder, *args)
        self._cached_bias = None

    def layout_arguments(self, height: int, width: int) -> tuple:
        """`(builder, args)` of the key layout on a `height x width` map."""
        raise NotImplementedError

    def key_layout(self, height: int, width: int, device: torch.device) -> FocalKeyLayout:
        """The layout held for the configured size, or the cached one for another size."""
        if (height, width) == self.layout_size:
            return self.layout
        builder, args = self.layout_arguments(height, width)
        return cached_key_layout(builder, args, device)

    def attention_bias(self, layout: FocalKeyLayout) -> torch.Tensor:
        """Additive bias `(num_windows or 1, num_heads, window_size**2, num_keys)`, padding keys masked out."""
        raise NotImplementedError

    def cached_attention_bias(self, layout: FocalKeyLayout, dtype: torch.dtype) -> torch.Tensor:
        """`attention_bias(layout)` in `dtype`. Without autograd (inference) the last one is kept and reused until the
        layout, or the storage or in-place version of a parameter or buffer it depends on, changes."""
        tensors = [*self.parameters(), *self.buffers(), *layout.buffers()]
        # (tensors made under inference mode have no version to compare)
        if torch.is_grad_enabled() or torch.compiler.is_compiling() or any(t.is_inference() for t in tensors):
            return self.attention_bias(layout).to(dtype)
        key = (layout, dtype, *((tensor.data_ptr(), tensor._version) for tensor in tensors))
        if self._cached_bias is None or self._cached_bias[0] != key:
            self._cached_bias = (key, self.attention_bias(layout).to(dtype))
        return self._cached_bias[1]

    def forward(
        self,
        hidden_states: torch.Tensor,
        pooled_states: list[torch.Tensor],
        input_dimensions: tuple[int, int],
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size, height, width, dim = hidden_states.shape
        window_size = self.geometry.window_size
        grid_h, grid_w = height // window_size, width // window_size
        layout = self.key_layout(*input_dimensions, hidden_states.device)

        # the attention's tokens, (batch_size, num_tokens + num_pooled, dim): the fine ones window by window, then the
        # pooled ones. One projection gives the queries (used for the fine tokens) and the keys and values that each
        # window gathers by its layout's `key_index`.
        num_tokens = height * width
        tokens = hidden_states.new_empty(
            batch_size, num_tokens + sum(p.shape[1] * p.shape[2] for p in pooled_states), dim
        )
        windows = hidden_states.view(batch_size, grid_h, window_size, grid_w, window_size, dim).transpose(2, 3)
        tokens[:, :num_tokens].view(windows.shape).copy_(windows)
        start = num_tokens
        for pooled in pooled_states:
            tokens[:, start : start + pooled.shape[1] * pooled.shape[2]] = pooled.flatten(1, 2)
            start += pooled.shape[1] * pooled.shape[2]
        qkv = self.qkv(tokens)
        bias = self.cached_attention_bias(layout, qkv.dtype)

        uses_cpu_kernel = (
            self.config._attn_implementation == "sdpa"
            and qkv.device.type == "cpu"
            and not (self.training and self.attention_dropout > 0)
        )
        if uses_cpu_kernel:
            attn_output = cpu_gathered_attention(qkv, bias, layout.key_index, self.num_heads, self.scaling)[0]
            attn_weights = None
        else:
            attn_output, attn_weights = self.attend(qkv, bias, layout, **kwargs)

        # (batch_size * num_windows, window_size**2, num_heads, head_dim) -> (batch_size, height, width, dim)
        attn_output = attn_output.view(batch_size, grid_h, grid_w, window_size, window_size, dim)
        attn_output = attn_output.transpose(2, 3).reshape(batch_size, height, width, dim)
        return self.proj_dropout(self.proj(attn_output)), attn_weights

    def attend(
        self, qkv: torch.Tensor, bias: torch.Tensor, layout: FocalKeyLayout, **kwargs: Unpack[TransformersKwargs]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention through the configured attention function (eager, other devices, attention dropout), from the
        projected tokens `qkv` `(batch, num_tokens + num_pooled, 3 * dim)`: the output `(batch * num_windows,
        window_size**2, num_heads, head_dim)` and, if eager, the weights `(batch * num_windows, num_heads,
        window_size**2, num_keys)`."""
        query, key, value = split_qkv(qkv, layout.key_index, bias.shape[2], self.num_heads)
        batch_size = qkv.shape[0]
        if bias.shape[0] == 1:  # the same for every window
            bias = bias.expand(query.shape[0], -1, -1, -1)
        elif batch_size > 1:
            bias = bias.repeat(batch_size, 1, 1, 1)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        return attention_interface(
            self,
            query,
            key,
            value,
            bias,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )


class FocalSelfAttention(FocalAttentionBase):
    """Focal self-attention (official `focal`): a window's own tokens, its expanded surroundings and a neighbourhood
    of pooled windows per coarse level, each with a learned relative position bias table."""

    def __init__(
        self, config: FocalConfig, dim: int, num_heads: int, geometry: FocalBlockGeometry, grid: tuple[int, int]
    ):
        super().__init__(config, dim, num_heads, geometry, grid)
        window_size = geometry.window_size
        window_area = window_size * window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", self._position_index(), persistent=False)
        if geometry.has_neighbors:
            num_neighbors = 4 * window_area - 4 * (window_size - geometry.expand_size) ** 2
            self.relative_position_bias_table_to_neighbors = nn.Parameter(
                torch.zeros(1, num_heads, window_area, num_neighbors)
            )
        else:
            self.relative_position_bias_table_to_neighbors = None
        self.relative_position_bias_table_to_windows = nn.ParameterList(
            nn.Parameter(torch.zeros(num_heads, (window_size + side - 1) ** 2)) for side in self._pooled_sides()
        )
        for level, index in enumerate(self._pooled_indices()):
            self.register_buffer(f"relative_position_index_to_windows_{level}", index, persistent=False)

    def _pooled_sides(self) -> list[int]:
        return [
            pooled_neighborhood(self.geometry.focal_window, level)[0]
            for level in range(self.geometry.num_pooled_levels)
        ]

    def _position_index(self) -> torch.Tensor:
        return relative_position_index(self.geometry.window_size, self.geometry.window_size).flatten()

    def _pooled_indices(self) -> list[torch.Tensor]:
        return [relative_position_index(self.geometry.window_size, side).flatten() for side in self._pooled_sides()]

    def reset_position_indices(self) -> None:
        """Recompute the index buffers (they are not saved; `from_pretrained` builds them on the meta device)."""
        init.copy_(self.relative_position_index, self._position_index())
        for level, index in enumerate(self._pooled_indices()):
            init.copy_(getattr(self, f"relative_position_index_to_windows_{level}"), index)

    def layout_arguments(self, height: int, width: int) -> tuple:
        return focal_key_layout, (height, width, self.geometry)

    def attention_bias(self, layout: FocalKeyLayout) -> torch.Tensor:
        """Position bias in the key order of `focal_key_layout`, its mask added:
        `(num_windows or 1, num_heads, window_size**2, num_keys)`."""
        window_area = self.geometry.window_size**2
        table = self.relative_position_bias_table[self.relative_position_index]
        fine = [table.view(window_area, window_area, -1).permute(2, 0, 1)]  # num_heads, window_area, slots
        if self.relative_position_bias_table_to_neighbors is not None:
            fine.append(self.relative_position_bias_table_to_neighbors[0])
        fine = F.pad(torch.cat(fine, dim=-1), (0, 1), value=float("-inf"))[:, :, layout.fine_slots]
        bias = (fine.logsumexp(-1) if fine.shape[-1] > 1 else fine[..., 0])[None]  # merged duplicates
        if layout.pooled_slots.shape[1]:
            pooled = [
                table[:, getattr(self, f"relative_position_index_to_windows_{level}")]
                for level, table in enumerate(self.relative_position_bias_table_to_windows)
            ]
            pooled = [table.view(self.num_heads, window_area, -1) for table in pooled]
            pooled = F.pad(torch.cat(pooled, dim=-1), (0, 1), value=float("-inf"))[:, :, layout.pooled_slots]
            num_windows = layout.pooled_slots.shape[0]
            bias = torch.cat((bias.expand(num_windows, -1, -1, -1), pooled.permute(2, 0, 1, 3)), dim=-1)
        if layout.key_mask is not None:
            bias = bias + layout.key_mask[:, None].to(bias.dtype)
        return layout.pad_bias(bias)


class FocalFastSelfAttention(FocalAttentionBase):
    """Focal-fast attention (official `focalv2`): per focal level, the `focal_topk` tokens nearest to the window,
    with a position bias computed by a small MLP (one per level) from the query-to-key coordinates."""

    def __init__(
        self, config: FocalConfig, dim: int, num_heads: int, geometry: FocalBlockGeometry, grid: tuple[int, int]
    ):
        super().__init__(config, dim, num_heads, geometry, grid)
        self.relative_position_mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(2, self.head_dim), nn.ReLU(), nn.Linear(self.head_dim, num_heads))
            for _ in range(geometry.focal_level)
        )

    def layout_arguments(self, height: int, width: int) -> tuple:
        geometry = self.geometry
        args = (height, width, geometry.window_size, geometry.focal_level, self.config.focal_topk)
        return focal_fast_key_layout, args

    def attention_bias(self, layout: FocalKeyLayout) -> torch.Tensor:
        """MLP position bias of every (window, query, key), `(num_windows, num_heads, window_size**2, num_keys)`."""
        tables = [
            mlp(distinct.to(mlp[0].weight.dtype))  # num_distinct, num_heads
            for mlp, distinct in zip(self.relative_position_mlps, layout.distinct_coords)
        ]
        return layout.pad_bias(torch.cat(tables).t()[:, layout.coord_index].transpose(0, 1))


FOCAL_ATTENTION_CLASSES = {"focal": FocalSelfAttention, "focal_fast": FocalFastSelfAttention}


class FocalMLP(nn.Module):
    """Position-wise MLP: `(..., dim)` -> `(..., dim)`."""

    def __init__(self, config: FocalConfig, dim: int):
        super().__init__()
        hidden_dim = int(dim * config.mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.dropout(self.act(self.fc1(hidden_states)))
        return self.dropout(self.fc2(hidden_states))


class FocalLayer(GradientCheckpointingLayer):
    """One Focal Transformer block: `(batch_size, height * width, dim)` -> same shape, and its attention weights."""

    def __init__(
        self,
        config: FocalConfig,
        dim: int,
        num_heads: int,
        geometry: FocalBlockGeometry,
        grid: tuple[int, int],
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        self.geometry = geometry
        self.layernorm_before = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.window_pooling = FocalWindowPooling(geometry, dim) if geometry.num_pooled_levels else None
        self.attention = FOCAL_ATTENTION_CLASSES[config.attention_type](config, dim, num_heads, geometry, grid)
        self.drop_path = FocalDropPath(drop_path_rate) if drop_path_rate > 0.0 else nn.Identity()
        self.layernorm_after = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.mlp = FocalMLP(config, dim)
        if config.use_layerscale:
            self.layer_scale_1 = nn.Parameter(torch.full((dim,), float(config.layerscale_value)))
            self.layer_scale_2 = nn.Parameter(torch.full((dim,), float(config.layerscale_value)))
        else:
            self.layer_scale_1 = self.layer_scale_2 = None

    def forward(
        self,
        hidden_states: torch.Tensor,
        input_dimensions: tuple[int, int],
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size, num_tokens, channels = hidden_states.shape
        if hidden_states.device.type == "cpu" and not (torch.is_grad_enabled() or torch.compiler.is_compiling()):
            # a few images at a time: every buffer stays small, in cache and recycled, where one large buffer is paged
            # in afresh on every call (with autograd every piece would be kept anyway; compiled code plans its own
            # buffers)
            mlp_bytes = num_tokens * self.mlp.fc1.out_features * hidden_states.element_size()  # per image
            chunk = max(1, CPU_CHUNK_BYTES // mlp_bytes)
            if chunk < batch_size:
                outputs = [self.block(part, input_dimensions, **kwargs) for part in hidden_states.split(chunk)]
                weights = [weights for _, weights in outputs if weights is not None]
                return torch.cat([output for output, _ in outputs]), torch.cat(weights) if weights else None
        return self.block(hidden_states, input_dimensions, **kwargs)

    def block(
        self,
        hidden_states: torch.Tensor,
        input_dimensions: tuple[int, int],
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The block on `hidden_states` `(batch_size, height * width, dim)`: its output and attention weights."""
        height, width = input_dimensions
        batch_size, _, channels = hidden_states.shape
        window_size, shift_size = self.geometry.window_size, self.geometry.shift_size
        shortcut = hidden_states

        hidden_states = self.layernorm_before(hidden_states).view(batch_size, height, width, channels)
        # pad to whole windows (right and bottom), then shift cyclically (SW-MSA)
        pad_h, pad_w = -height % window_size, -width % window_size
        if pad_h or pad_w:
            hidden_states = F.pad(hidden_states, (0, 0, 0, pad_w, 0, pad_h))
        if shift_size:
            hidden_states = torch.roll(hidden_states, shifts=(-shift_size, -shift_size), dims=(1, 2))
        pooled_states = self.window_pooling(hidden_states) if self.window_pooling is not None else []

        attention_output, attn_weights = self.attention(hidden_states, pooled_states, input_dimensions, **kwargs)

        if shift_size:
            attention_output = torch.roll(attention_output, shifts=(shift_size, shift_size), dims=(1, 2))
        attention_output = attention_output[:, :height, :width].reshape(batch_size, height * width, channels)
        if self.layer_scale_1 is not None:
            attention_output = self.layer_scale_1 * attention_output
        hidden_states = shortcut + self.drop_path(attention_output)

        mlp_output = self.mlp(self.layernorm_after(hidden_states))
        if self.layer_scale_2 is not None:
            mlp_output = self.layer_scale_2 * mlp_output
        hidden_states = hidden_states + self.drop_path(mlp_output)
        return hidden_states, attn_weights


class FocalStage(nn.Module):
    """A stage: its blocks, then (except the last stage) a downsampling patch embedding.

    Returns the stage output (after downsampling), its `(batch_size, channels, height, width)` map (before
    downsampling when `output_hidden_states_before_downsampling`) and the last block's attention weights.
    """

    def __init__(self, config: FocalConfig, stage: int, drop_path: list[float]):
        super().__init__()
        dim = config.embed_dim * 2**stage
        self.blocks = nn.ModuleList(
            FocalLayer(
                config,
                dim,
                config.num_heads[stage],
                config.block_geometry(stage, block),
                config.stage_grid(stage),
                drop_path[block],
            )
            for block in range(config.depths[stage])
        )
        is_last = stage == len(config.depths) - 1
        self.downsample = None if is_last else FocalPatchEmbeddings(config, dim, 2 * dim, is_stem=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        input_dimensions: tuple[int, int],
        output_hidden_states_before_downsampling: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, tuple[int, int]]:
        height, width = input_dimensions
        attn_weights = None
        for block in self.blocks:
            hidden_states, attn_weights = block(hidden_states, input_dimensions, **kwargs)

        batch_size, _, channels = hidden_states.shape
        spatial = hidden_states.transpose(1, 2).reshape(batch_size, channels, height, width)
        reshaped = spatial
        output_dimensions = input_dimensions
        if self.downsample is not None:
            hidden_states, output_dimensions = self.downsample(spatial)
            if not output_hidden_states_before_downsampling:
                reshaped = hidden_states.transpose(1, 2).reshape(batch_size, -1, *output_dimensions)
        return hidden_states, reshaped, attn_weights, output_dimensions


@auto_docstring
class FocalPreTrainedModel(PreTrainedModel):
    config: FocalConfig
    config_class = FocalConfig
    base_model_prefix = "focal"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["FocalStage"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = True
    _can_record_outputs = {
        "hidden_states": OutputRecorder(FocalStage, index=0, capture_initial_hidden_state=True),
        "attentions": OutputRecorder(FocalStage, index=2, capture_initial_hidden_state=False),
    }

    def _init_weights(self, module):
        """Truncated-normal linear layers and bias tables as the official code; pooling starts as a mean."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        else:
            super()._init_weights(module)
        if isinstance(module, FocalEmbeddings) and module.position_embeddings is not None:
            init.trunc_normal_(module.position_embeddings, std=std)
        elif isinstance(module, FocalWindowPooling) and module.pool_method == "fc":
            for layer in module.pool_layers:
                init.constant_(layer.weight, 1.0 / layer.weight.shape[-1])
                init.zeros_(layer.bias)
        elif isinstance(module, FocalSelfAttention):
            init.trunc_normal_(module.relative_position_bias_table, std=std)
            if module.relative_position_bias_table_to_neighbors is not None:
                init.trunc_normal_(module.relative_position_bias_table_to_neighbors, std=std)
            for table in module.relative_position_bias_table_to_windows:
                init.trunc_normal_(table, std=std)
            module.reset_position_indices()
        elif isinstance(module, FocalKeyLayout):
            module.reset()
        elif isinstance(module, FocalLayer) and module.layer_scale_1 is not None:
            init.constant_(module.layer_scale_1, self.config.layerscale_value)
            init.constant_(module.layer_scale_2, self.config.layerscale_value)

    def check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        """Raise a `ValueError` saying what is expected unless `pixel_values` is a usable image batch."""
        expected = (
            f"Expected pixel_values of shape (batch_size, {self.config.num_channels}, height, width) with height "
            f"and width >= {self.config.total_stride} (the model's total stride)"
        )
        if not isinstance(pixel_values, torch.Tensor):
            raise ValueError(f"{expected}, got {type(pixel_values).__name__}.")
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(f"{expected}, got shape {tuple(pixel_values.shape)}.")
        if min(pixel_values.shape[-2:]) < self.config.total_stride:
            raise ValueError(f"{expected}, got {tuple(pixel_values.shape[-2:])}.")
        if not pixel_values.is_floating_point():
            raise ValueError(f"{expected} as a floating-point tensor, got {pixel_values.dtype}.")


class FocalEncoder(FocalPreTrainedModel):
    def __init__(self, config: FocalConfig):
        super().__init__(config)
        total = sum(config.depths)
        rates = torch.linspace(0, config.drop_path_rate, total, device="cpu").tolist()  # linear stochastic depth
        starts = [sum(config.depths[:stage]) for stage in range(len(config.depths))]
        self.layers = nn.ModuleList(
            FocalStage(config, stage, rates[start : start + depth])
            for stage, (start, depth) in enumerate(zip(starts, config.depths))
        )
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        hidden_states: torch.Tensor,
        input_dimensions: tuple[int, int],
        output_hidden_states: bool = False,
        output_hidden_states_before_downsampling: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> FocalEncoderOutput:
        r"""
        hidden_states (`(batch_size, height * width, embed_dim)`): the embeddings.
        input_dimensions (`tuple[int, int]`): their token grid `(height, width)`.
        output_hidden_states_before_downsampling (`bool`): `reshaped_hidden_states` holds each stage's map before
            its downsampling (what `FocalBackbone` outputs) instead of after.
        """
        reshaped_hidden_states = None
        if output_hidden_states:
            batch_size, _, channels = hidden_states.shape
            reshaped_hidden_states = (hidden_states.transpose(1, 2).reshape(batch_size, channels, *input_dimensions),)
        for stage in self.layers:
            hidden_states, reshaped, _, input_dimensions = stage(
                hidden_states,
                input_dimensions,
                output_hidden_states_before_downsampling=output_hidden_states_before_downsampling,
                **kwargs,
            )
            if output_hidden_states:
                reshaped_hidden_states += (reshaped,)
        return FocalEncoderOutput(last_hidden_state=hidden_states, reshaped_hidden_states=reshaped_hidden_states)


@auto_docstring
class FocalModel(FocalPreTrainedModel):
    def __init__(self, config: FocalConfig, add_pooling_layer: bool = True):
        r"""
        add_pooling_layer (`bool`, *optional*, defaults to `True`):
            Whether to average the final tokens into `pooler_output`.
        """
        super().__init__(config)
        self.num_features = config.hidden_size
        self.embeddings = FocalEmbeddings(config)
        self.encoder = FocalEncoder(config)
        self.layernorm = nn.LayerNorm(self.num_features, eps=config.layer_norm_eps)
        self.pooler = nn.AdaptiveAvgPool1d(1) if add_pooling_layer else None
        self.post_init()

    def get_input_embeddings(self) -> FocalPatchEmbeddings:
        return self.embeddings.patch_embeddings

    @can_return_tuple
    @auto_docstring
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        output_hidden_states_before_downsampling: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> FocalModelOutput:
        r"""
        output_hidden_states_before_downsampling (`bool`, *optional*, defaults to `False`):
            Whether `reshaped_hidden_states` holds each stage's map before its downsampling.
        """
        self.check_pixel_values(pixel_values)
        output_hidden_states = kwargs.pop("output_hidden_states", self.config.output_hidden_states)
        embedding_output, input_dimensions = self.embeddings(pixel_values)
        encoder_outputs = self.encoder(
            embedding_output,
            input_dimensions,
            output_hidden_states=output_hidden_states,
            output_hidden_states_before_downsampling=output_hidden_states_before_downsampling,
            **kwargs,
        )
        sequence_output = self.layernorm(encoder_outputs.last_hidden_state)
        pooled_output = None
        if self.pooler is not None:
            pooled_output = torch.flatten(self.pooler(sequence_output.transpose(1, 2)), 1)
        return FocalModelOutput(
            last_hidden_state=sequence_output,
            pooler_output=pooled_output,
            hidden_states=encoder_outputs.hidden_states,
            attentions=encoder_outputs.attentions,
            reshaped_hidden_states=encoder_outputs.reshaped_hidden_states,
        )


@auto_docstring(
    custom_intro="""
    Focal Transformer with an image classification head (a linear layer on the average-pooled final tokens), e.g.
    for ImageNet.
    """
)
class FocalForImageClassification(FocalPreTrainedModel):
    def __init__(self, config: FocalConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.focal = FocalModel(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    @can_return_tuple
    @auto_docstring
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> FocalImageClassifierOutput:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Labels for the loss: class indices in `[0, config.num_labels)` (cross-entropy), floats for regression
            when `config.num_labels == 1`, or multi-hot rows with `problem_type="multi_label_classification"`.
        """
        outputs = self.focal(pixel_values, **kwargs)
        logits = self.classifier(outputs.pooler_output)
        loss = None
        if labels is not None:
            loss = self.loss_function(labels, logits, self.config, **kwargs)
        return FocalImageClassifierOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            reshaped_hidden_states=outputs.reshaped_hidden_states,
        )


@auto_docstring(
    custom_intro="""
    Focal Transformer backbone, to be used with frameworks like UperNet, DETR and Mask2Former.
    """
)
class FocalBackbone(BackboneMixin, FocalPreTrainedModel):
    _keys_to_ignore_on_load_missing = [r"hidden_states_norms\."]
    # a classification folder's head and final norm have no place here
    _keys_to_ignore_on_load_unexpected = [r"classifier\.", r"focal\.layernorm\."]

    def __init__(self, config: FocalConfig):
        super().__init__(config)
        self.num_features = [config.embed_dim] + [config.embed_dim * 2**i for i in range(len(config.depths))]
        self.focal = FocalModel(config, add_pooling_layer=False)
        # the per-stage norms replace the final one; an unused trainable norm would break DDP without
        # find_unused_parameters
        self.focal.layernorm = nn.Identity()
        self.hidden_states_norms = nn.ModuleDict(
            {
                stage: nn.LayerNorm(channels, eps=config.layer_norm_eps)
                for stage, channels in zip(self.out_features, self.channels)
            }
        )
        self.post_init()

    @can_return_tuple
    @filter_output_hidden_states
    @auto_docstring
    def forward(self, pixel_values: torch.Tensor, **kwargs: Unpack[TransformersKwargs]) -> BackboneOutput:
        r"""
        Returns `feature_maps`: for each of `config.out_features`, the stage's output before its downsampling,
        LayerNorm'd, as `(batch_size, channels, height, width)`.
        """
        kwargs["output_hidden_states"] = True
        outputs = self.focal(pixel_values, output_hidden_states_before_downsampling=True, **kwargs)
        feature_maps = tuple(
            self.hidden_states_norms[stage](hidden_state.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).contiguous()
            for stage, hidden_state in zip(self.stage_names, outputs.reshaped_hidden_states)
            if stage in self.out_features
        )
        return BackboneOutput(
            feature_maps=feature_maps,
            hidden_states=outputs.reshaped_hidden_states,
            attentions=outputs.attentions,
        )


__all__ = [
    "FocalBackbone",
    "FocalForImageClassification",
    "FocalModel",
    "FocalPreTrainedModel",
]
