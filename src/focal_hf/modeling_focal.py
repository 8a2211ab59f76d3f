# Copyright 2026 The focal-hf authors. Licensed under the Apache License, Version 2.0.
"""PyTorch Focal Transformer (Yang et al., "Focal Self-attention for Local-Global Interactions in Vision Transformers").

Each block attends, from every window of `window_size**2` query tokens,
1. the window's own tokens (fine-grained, with a relative position bias),
2. the fine-grained tokens around the window, up to `expand_size` away ("expanded" window), and
3. for each further focal level, the tokens of a map where sub-windows are pooled into one token, in a
   neighbourhood of windows around it (coarse-grained).
Each window gathers its keys and values from one projection of the tokens (the fine ones window by window, then the
pooled ones) by a key layout: index maps and masks computed from the feature-map size with tensor operations, so
they trace for symbolic sizes (`torch.export`, `torch.compile(dynamic=True)`) and are built once per size in eager
mode. The position biases and masks form one additive attention bias, so the attention itself is one call of an
attention function of transformers' `AttentionInterface`: `"focal_sdpa"` (the default, `focal_sdpa_attention`),
`"sdpa"`, `"eager"` or any registered one.
"""

import contextlib
import dataclasses
import functools
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.library import custom_op
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.backbone_utils import BackboneMixin, filter_output_hidden_states
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BackboneOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface, PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs, auto_docstring, logging
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_focal import FocalBlockGeometry, FocalConfig, pooled_window_size
from .requirements import check_tracing_requirement

try:  # focal_sdpa's kernels on NVIDIA GPUs (Triton comes with PyTorch's CUDA builds); without Triton, SDPA there
    from .triton_attention import fused_gathered_attention, fused_gathered_attention_backward
except ImportError:
    fused_gathered_attention = fused_gathered_attention_backward = None

logger = logging.get_logger(__name__)

# The official code masks across shifted-window regions with -100 (not -inf).
MASK_VALUE = -100.0
# Without autograd on CPU, a block processes as many images at a time as keep its MLP's hidden activations within
# this many bytes.
CPU_CHUNK_BYTES = 8 * 2**20
# Keys per window are padded (with masked keys) to a multiple of this: attention kernels then run without vector tails.
KEY_ALIGNMENT = 16
# Without autograd, focal_sdpa runs its Triton kernels from this many images: below it inference is bound by the host,
# where a kernel launch through Triton costs more than the operators of the SDPA path (Focal-T on an H200: 0.91-0.92x
# at batches 1, 8 and 32 with the kernels, 1.49x at 128).
TRITON_MIN_INFERENCE_BATCH = 128
# The name of the CPU attention op in the `focal_transformer` namespace (`cpu_gathered_attention`), one per signature.
CPU_ATTENTION_OP = "cpu_gathered_attention_2"


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


# ---------------------------------------------------------------------------------------------- window geometry
# Everything that depends on the feature-map size is computed here with tensor operations on its height and width,
# which may be symbolic: `torch.export` and `torch.compile(dynamic=True)` trace one program for every size. Static
# structure (which offsets a window attends) is plain Python on the block's geometry.


def known_zero(*sizes) -> bool:
    """Whether every size is 0 in eager mode; traced (for any input size), never: the test would fix the size."""
    return not torch.compiler.is_compiling() and all(size == 0 for size in sizes)


def floor_mod(values: torch.Tensor, divisor) -> torch.Tensor:
    """`values % divisor` (Python's sign convention) written as `values - values // divisor * divisor`, which ONNX
    exports for a symbolic divisor."""
    return values - values // divisor * divisor


def ceil_div(size, divisor: int):
    """`ceil(size / divisor)` for ints and symbolic sizes."""
    return (size + divisor - 1) // divisor


def grid_coordinates(height, width, device: torch.device | None = None) -> torch.Tensor:
    """Row-major coordinates `(2, height * width)` of a `height x width` grid."""
    index = torch.arange(height * width, device=device)  # (no meshgrid: its checks would fix symbolic sizes)
    return torch.stack((index // width, floor_mod(index, width)))


def is_exporting() -> bool:
    """Whether `torch.export` is tracing: `torch.compiler.is_exporting()`'s flag, read directly, since dynamo before
    torch 2.12 answers `torch.compiler.is_exporting()` with True inside `torch.compile` too."""
    return torch.compiler._is_exporting_flag


def exportable_at_any_size(forward: Callable) -> Callable:
    """Decorates a `forward` so that while `torch.export` traces it, sizes are size-oblivious: the program is never
    specialised on a feature map being one window (or token) wide, a 0/1 specialisation, so one exported program
    serves every input size. Traced by a torch too old to trace the model, it says which release is needed
    (`check_tracing_requirement`). No effect in eager mode."""

    @functools.wraps(forward)
    def wrapper(*args, **kwargs):
        if torch.compiler.is_compiling():
            check_tracing_requirement()
        if not is_exporting():
            return forward(*args, **kwargs)
        from torch.fx.experimental import _config

        with _config.patch(backed_size_oblivious=True):
            return forward(*args, **kwargs)

    return wrapper


def warn_if_one_window_example(config: FocalConfig, input_dimensions: tuple, window_size: int) -> None:
    """While `torch.export` traces with symbolic sizes: warn (once) if a stage's map is at most one window wide or high
    at the example input. The program is exact at every size all the same, but inductor, compiling it ahead of time
    (AOTInductor), decides some of its index arithmetic by the example's sizes and checks none of those decisions at
    run time: compiled from such an example, a program gives NaN or aborts at other sizes (torch 2.13)."""
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    if any(not is_concrete_int(size) and size.node.hint <= window_size for size in input_dimensions):
        height, width = config.image_size_2d
        logger.warning_once(
            "torch.export: at this example input a stage's map is one window wide or high. The exported program is "
            "exact at every input size (`program.module()`, ONNX), but a program compiled from it with AOTInductor "
            "(`torch._inductor.aoti_compile_and_package`) is specialised on that and wrong at other sizes. To compile "
            "one for every size, export with an example at which every stage is at least two windows wide and high, "
            f"e.g. twice the configured image size: {2 * height}x{2 * width}."
        )


def copy_as(tensor: torch.Tensor, *shape) -> torch.Tensor:
    """`tensor` (typically permuted) copied into a new contiguous tensor of `shape`. Unlike `reshape`, it never
    decides between a view and a copy, a decision that a traced program would fix for one input size."""
    return tensor.clone(memory_format=torch.contiguous_format).view(*shape)


def channels_first(hidden_states: torch.Tensor) -> torch.Tensor:
    """A map `(batch_size, height, width, channels)` as `(batch_size, channels, height, width)` for a convolution or
    pooling: a view; compiled, a contiguous copy. Torch 2.13's inductor cannot order the strides of the view when the
    map's sides are symbolic (`cannot determine truth value of Relational`, pytorch/pytorch#185510), which made
    `torch.compile` fail to train at a second input size."""
    hidden_states = hidden_states.permute(0, 3, 1, 2)
    return copy_as(hidden_states, *hidden_states.shape) if torch.compiler.is_compiling() else hidden_states


def window_partition(hidden_states: torch.Tensor, window_size: int) -> torch.Tensor:
    """`(batch_size, height, width, channels)` (sides multiples of `window_size`) -> its tokens window by window
    `(batch_size, num_windows * window_size**2, channels)`: windows row-major, tokens row-major within each."""
    batch_size, height, width, channels = hidden_states.shape
    windows = hidden_states.view(
        batch_size, height // window_size, window_size, width // window_size, window_size, channels
    )
    return copy_as(windows.transpose(2, 3), batch_size, -1, channels)


def window_reverse(windows: torch.Tensor, window_size: int, height, width) -> torch.Tensor:
    """Inverse of `window_partition`: `(batch_size, num_windows * window_size**2, channels)` ->
    `(batch_size, height, width, channels)`."""
    batch_size, _, channels = windows.shape
    windows = windows.view(batch_size, height // window_size, width // window_size, window_size, window_size, channels)
    return copy_as(windows.transpose(2, 3), batch_size, height, width, channels)


def window_order(rows: torch.Tensor, cols: torch.Tensor, window_size: int, grid_w) -> torch.Tensor:
    """Position in `window_partition` order of the tokens at (`rows`, `cols`) of a map `grid_w` windows wide."""
    windows = (rows // window_size) * grid_w + cols // window_size
    return windows * window_size**2 + (rows % window_size) * window_size + cols % window_size


def relative_position_index(query_size: int, key_size: int) -> torch.Tensor:
    """Index `(query_size**2, key_size**2)` into a `((query_size + key_size - 1) ** 2)` bias table, for a
    `query_size` window and a `key_size` grid of keys both anchored at their top-left corners."""
    queries, keys = grid_coordinates(query_size, query_size), grid_coordinates(key_size, key_size)
    relative = queries[:, :, None] - keys[:, None, :] + (key_size - 1)  # 2, Nq, Nk, both in [0, q + k - 2]
    return relative[0] * (query_size + key_size - 1) + relative[1]


def neighbor_slots(window_size: int, expand_size: int) -> list[tuple[int, int]]:
    """Offsets from a window's top-left token to the tokens around it that a window with `expand_size` attends, one
    per official key slot and in the official order: the four windows shifted diagonally by `expand_size` (towards
    bottom-right, bottom-left, top-right, top-left), each without the part inside the window."""
    slots = []
    for d_row, d_col in ((1, 1), (1, -1), (-1, 1), (-1, -1)):
        for row in range(window_size):
            for col in range(window_size):
                inside_row = row < window_size - expand_size if d_row > 0 else row >= expand_size
                inside_col = col < window_size - expand_size if d_col > 0 else col >= expand_size
                if not (inside_row and inside_col):
                    slots.append((row + d_row * expand_size, col + d_col * expand_size))
    return slots


def fine_keys(geometry: FocalBlockGeometry) -> tuple[list[tuple[int, int]], list[list[int]]]:
    """The fine-grained keys of a focal window: their offsets from its top-left token (its own tokens, then each
    distinct surrounding offset in order of first appearance) and, for each key, the official slots it stands for
    (own tokens: slots `0..window_size**2-1`, surrounding slots after them). Two shifted windows overlap outside the
    window, so some surrounding offsets fill two slots: one key then carries both slots' weights (see
    `FocalSelfAttention.position_bias`)."""
    window_size = geometry.window_size
    offsets = [(row, col) for row in range(window_size) for col in range(window_size)]
    slots = [[slot] for slot in range(len(offsets))]
    if geometry.has_neighbors:
        first: dict[tuple[int, int], int] = {}
        for slot, offset in enumerate(neighbor_slots(window_size, geometry.expand_size), start=len(offsets)):
            if offset in first:
                slots[first[offset]].append(slot)
            else:
                first[offset] = len(offsets)
                offsets.append(offset)
                slots.append([slot])
    return offsets, slots


def pooled_neighborhood(focal_window: int, level: int) -> tuple[int, torch.Tensor]:
    """Side and `(side**2, 2)` offsets of the neighbourhood of pooled tokens a window attends at pooled level
    `level`, relative to the window's own position on that level's map (official unfold, valid part only)."""
    stride = 2**level
    kernel = 2 * (focal_window // 2) + 2 * stride - 1
    first = stride - 1  # the official code keeps the kernel's last `focal_window + stride - 1` rows/cols
    index = torch.arange(first, kernel) - kernel // 2
    rows, cols = torch.meshgrid(index, index, indexing="ij")
    return kernel - first, torch.stack((rows, cols), -1).flatten(0, 1)


def pad_keys(key_index: torch.Tensor, key_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad each window's keys with masked (-inf) copies of row 0 to a multiple of `KEY_ALIGNMENT` keys: attention
    kernels then run without vector tails. The index `(num_windows, num_keys)` is stored key by key (its transpose
    is contiguous), the order in which `gather_keys` takes the keys, so that no call has to reorder it."""
    padding = -key_index.shape[-1] % KEY_ALIGNMENT
    key_index = copy_as(F.pad(key_index, (0, padding)).t(), key_index.shape[1] + padding, -1).t()  # key by key
    return key_index, F.pad(key_mask, (0, padding), value=float("-inf"))


@dataclass
class FocalKeyLayout:
    """Where the keys of every window of a focal-attention block come from, on one map (`focal_key_layout`).

    key_index (`(num_windows, num_keys)`, stored key by key: `pad_keys`): rows of the attention's token source (the
        padded, shifted map in `window_partition` order, then each pooled map row-major): the window's own tokens,
        its distinct surrounding tokens (`fine_keys`; taken with the official `torch.roll` wrap-around), then its
        neighbourhood on each pooled map in official order; padded to a multiple of `KEY_ALIGNMENT`.
    key_mask (`(num_windows, window_size**2 or 1, num_keys)`): added to the attention logits: -100 across
        shifted-window regions on the own tokens (as the official code), -inf on pooled slots outside the map (the
        official code attends zero tokens there at -100, a weight below float precision) and on padding keys. It has
        a row per query only in shifted blocks.
    """

    key_index: torch.Tensor
    key_mask: torch.Tensor


def shift_window_mask(height, width, window_size: int, shift_size: int, device: torch.device) -> torch.Tensor:
    """Swin's shifted-window mask `(num_windows, window_size**2, window_size**2)` on the padded, shifted map: 0
    within a region, -100 across."""

    def regions(size):
        index = torch.arange(size, device=device)
        return (index >= size - window_size).long() + (index >= size - shift_size).long()

    labels = regions(height)[:, None] * 3 + regions(width)[None, :]
    labels = window_partition(labels[None, :, :, None], window_size).view(-1, window_size * window_size)
    return (labels[:, None, :] != labels[:, :, None]).float() * MASK_VALUE


def focal_key_layout(height, width, geometry: FocalBlockGeometry, device: torch.device) -> FocalKeyLayout:
    """The `FocalKeyLayout` of a focal-attention block with `geometry` on a `height x width` map (before padding
    to whole windows)."""
    window_size = geometry.window_size
    grid_h, grid_w = ceil_div(height, window_size), ceil_div(width, window_size)
    padded_h, padded_w = grid_h * window_size, grid_w * window_size
    windows = grid_coordinates(grid_h, grid_w, device)  # 2, num_windows

    offsets = torch.tensor(fine_keys(geometry)[0], device=device)  # num_fine, 2
    rows = floor_mod(windows[0][:, None] * window_size + offsets[None, :, 0], padded_h)
    cols = floor_mod(windows[1][:, None] * window_size + offsets[None, :, 1], padded_w)
    key_index = [window_order(rows, cols, window_size, grid_w)]
    num_windows, num_fine = key_index[0].shape
    if geometry.shift_size > 0:
        fine_mask = F.pad(
            shift_window_mask(padded_h, padded_w, window_size, geometry.shift_size, device),
            (0, num_fine - window_size**2),
        )
    else:
        fine_mask = torch.zeros(1, 1, num_fine, device=device).expand(num_windows, -1, -1)
    key_mask = [fine_mask]

    start = padded_h * padded_w
    for level in range(geometry.num_pooled_levels):
        stride, map_h, map_w = 2**level, grid_h * 2**level, grid_w * 2**level
        pooled_offsets = pooled_neighborhood(geometry.focal_window, level)[1].to(device)
        rows = windows[0][:, None] * stride + pooled_offsets[None, :, 0]
        cols = windows[1][:, None] * stride + pooled_offsets[None, :, 1]
        inside = (rows >= 0) & (rows < map_h) & (cols >= 0) & (cols < map_w)
        key_index.append(torch.where(inside, start + rows * map_w + cols, 0))
        mask = torch.where(inside, 0.0, float("-inf"))[:, None, :]
        key_mask.append(mask.expand(-1, fine_mask.shape[1], -1))
        start = start + map_h * map_w
    return FocalKeyLayout(*pad_keys(torch.cat(key_index, dim=1), torch.cat(key_mask, dim=2)))


@dataclass
class FocalFastKeyLayout:
    """Where the keys of every window of a Focal-fast block come from, on one map (`focal_fast_key_layout`).

    key_index (`(num_windows, num_keys)`, stored key by key: `pad_keys`): rows of the attention's token source: for
        each focal level the `focal_topk` tokens nearest to the window (fewer if the level's map has fewer), padded
        to a multiple of `KEY_ALIGNMENT`.
    coords (`(num_coords, 2)`): every query-to-key offset (in tokens) that can occur on this map, a dense grid:
        each level's position MLP is evaluated on it once.
    coord_index (`(num_windows, window_size**2, num_real_keys)`): for each (window, query, key), the row that
        holds its offset in the levels' position MLP outputs stacked (`focal_level * num_coords` rows: level `l`'s
        key at `l * num_coords` plus the row of `coords` that holds its offset).
    key_mask (`(num_windows, 1, num_keys)`): -inf on the padding keys, 0 elsewhere.
    """

    key_index: torch.Tensor
    coords: torch.Tensor
    coord_index: torch.Tensor
    key_mask: torch.Tensor


def nearest_tokens(queries: torch.Tensor, keys: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query position `(2, num_queries)`, the `topk` nearest key positions `(2, num_keys)` (Euclidean, ties
    broken by `torch.topk` as in the official code): their indices `(num_queries, k)` and the query-minus-key
    offsets `(2, num_queries, k)`."""
    relative = queries[:, :, None] - keys[:, None, :]
    distances = torch.sqrt(relative[0].float() ** 2 + relative[1].float() ** 2)
    num_keys = keys.shape[1]  # (a static size: `min`, which dynamo before torch 2.12 traces and `sym_min` not)
    _, index = torch.topk(
        -distances, min(topk, num_keys) if isinstance(num_keys, int) else torch.sym_min(topk, num_keys), dim=1
    )
    return index, torch.gather(relative, 2, index[None].expand(2, -1, -1))


def focal_fast_key_layout(
    height, width, window_size: int, focal_level: int, topk: int, device: torch.device
) -> FocalFastKeyLayout:
    """The `FocalFastKeyLayout` of a Focal-fast block on a `height x width` map (before padding to whole windows).

    Level 0: the `topk` real tokens nearest to each window's centre. Level `l` >= 1: the `topk` windows nearest to
    the window on the window grid, read from pooled map `l` as the official code does (for `l` >= 2 it indexes that
    finer map with window-grid indices). Offsets are in tokens (windows scaled by the window size) and include each
    query's position in its window.
    """
    grid_h, grid_w = ceil_div(height, window_size), ceil_div(width, window_size)
    padded_h, padded_w = grid_h * window_size, grid_w * window_size
    windows = grid_coordinates(grid_h, grid_w, device)
    in_window = grid_coordinates(window_size, window_size, device) - window_size // 2  # query offsets from the centre
    # every query-to-key offset lies in [-padded_h, padded_h] x [-padded_w, padded_w]: number them row-major
    offset = torch.tensor([padded_h, padded_w], device=device)[:, None]
    coords = (grid_coordinates(2 * padded_h + 1, 2 * padded_w + 1, device) - offset).t().float()

    key_index, coord_index = [], []
    start = padded_h * padded_w
    for level in range(focal_level):
        if level == 0:
            tokens = grid_coordinates(height, width, device)
            index, relative = nearest_tokens(windows * window_size + window_size // 2, tokens, topk)
            key_index.append(window_order(tokens[0][index], tokens[1][index], window_size, grid_w))
        else:
            index, relative = nearest_tokens(windows, windows, topk)
            relative = relative * window_size
            key_index.append(start + index)
            start = start + (grid_h * 2 ** (level - 1)) * (grid_w * 2 ** (level - 1))
        offsets = relative[:, :, None, :] + in_window[:, None, :, None]  # 2, num_windows, window_area, k
        rows = (offsets[0] + padded_h) * (2 * padded_w + 1) + offsets[1] + padded_w
        coord_index.append(level * coords.shape[0] + rows)
    key_index = torch.cat(key_index, dim=1)
    key_index, key_mask = pad_keys(key_index, torch.zeros(key_index.shape[0], 1, key_index.shape[1], device=device))
    return FocalFastKeyLayout(key_index, coords, torch.cat(coord_index, dim=-1), key_mask)


@functools.lru_cache(maxsize=256)
def cached_key_layout(builder: Callable, args: tuple, device: torch.device):
    """`builder(*args)`, built on the CPU (where `torch.topk` breaks distance ties as the official code's tables do,
    on every device) and moved to `device`."""
    with torch.inference_mode(False):  # outlives the current mode: normal tensors, usable by autograd later
        layout = builder(*args, torch.device("cpu"))
        moved = {
            field.name: [t.to(device) for t in value] if isinstance(value, list) else value.to(device)
            for field in dataclasses.fields(layout)
            for value in [getattr(layout, field.name)]
        }
        return type(layout)(**moved)


def key_layout(builder: Callable, args: tuple, device: torch.device):
    """`builder(*args, device)`: in eager mode built once per map size and kept (process-wide, shared by blocks of
    the same geometry); traced (`torch.compile`, `torch.export`) it is part of the graph, for symbolic sizes."""
    if torch.compiler.is_compiling():
        return builder(*args, device)
    return cached_key_layout(builder, args, device)


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
        # one product with each sample's 0 or 1 / keep_prob (forward and backward: one pass over the activations)
        scale = hidden_states.new_empty(shape).bernoulli_(keep_prob).div_(keep_prob)
        return hidden_states * scale

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
        self.projection = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding)
        has_norm = config.patch_norm or not is_stem
        self.norm = nn.LayerNorm(out_channels, eps=config.layer_norm_eps) if has_norm else None

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        if self.pre_norm is not None:
            pixel_values = self.pre_norm(pixel_values)
        embeddings = self.projection(pixel_values)
        batch_size, channels, height, width = embeddings.shape
        embeddings = copy_as(embeddings.permute(0, 2, 3, 1), batch_size, height * width, channels)
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
        if known_zero(height - self.grid_size[0], width - self.grid_size[1]):
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
    """Plain attention with an additive float bias, as the official code computes it, here on the windows folded into
    the head dimension (`fold_windows`): query `(batch_size, num_windows * num_heads, queries, head_dim)`, key and
    value `(batch_size, num_windows * num_heads, keys, head_dim)` -> the output `(batch_size, queries, num_windows *
    num_heads, head_dim)` and the weights `(batch_size * num_windows, num_heads, queries, keys)`, a view of the
    tensor the output is computed from (so that its gradient can be retained)."""
    attn_weights = torch.matmul(query * scaling, key.transpose(-2, -1))
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    folded_shape = attn_weights.shape
    attn_weights = attn_weights.view(-1, module.num_heads, *folded_shape[2:])
    attn_output = torch.matmul(attn_weights.view(folded_shape), value)
    return attn_output.transpose(1, 2).contiguous(), attn_weights


def fold_windows(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_index: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The windows' attention as one attention call with the windows folded into the head dimension, window by
    window (folded head `window * num_heads + head`).

    query `(batch_size, num_windows * window_area, dim)` (window by window), key and value `(batch_size, num_tokens,
    dim)` (the keys' and values' source), key_index `(num_windows, num_keys)`, bias `(num_windows, num_heads,
    window_area, num_keys)` -> query `(batch_size, num_windows * num_heads, window_area, head_dim)`, key and value
    `(batch_size, num_windows * num_heads, num_keys, head_dim)` (`gather_keys`) and the bias `(1, num_windows *
    num_heads, window_area, num_keys)`, a view that broadcasts over the batch (one copy whatever the batch size).
    The query is copied into the layout in which fused attention kernels read it and hand back its gradient,
    `(batch_size, window_area, num_windows * num_heads, head_dim)` in memory.
    """
    batch_size, num_windows = query.shape[0], key_index.shape[0]
    num_heads = bias.shape[1]
    window_area = bias.shape[2]
    head_dim = query.shape[-1] // num_heads
    query = query.view(batch_size, num_windows, window_area, -1).transpose(1, 2)
    query = copy_as(query, batch_size, window_area, num_windows * num_heads, head_dim).transpose(1, 2)
    key, value = (gather_keys(source, key_index, num_heads) for source in (key, value))
    # (flatten, not `view(1, num_windows * num_heads, ...)`, which torch.export 2.13 traced as the unchanged bias on
    # maps of one window with symbolic sizes)
    return query, key, value, bias.flatten(0, 1)[None]


def gather_keys(source: torch.Tensor, key_index: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The keys (or values) of `fold_windows`: source `(batch_size, num_tokens, dim)`, key_index `(num_windows,
    num_keys)` -> `(batch_size, num_windows * num_heads, num_keys, head_dim)`, a view of one gather of whole rows
    taken key by key: `(batch_size, num_keys, num_windows * num_heads, head_dim)` in memory, the layout in which
    fused attention kernels (memory-efficient, flash) hand back the gradients of keys and values, so that the
    gradient reaches the gather's backward pass (`index_add_` of whole rows) without a copy."""
    batch_size, _, dim = source.shape
    num_windows, num_keys = key_index.shape
    gathered = source.index_select(1, key_index.t().reshape(-1))
    return gathered.view(batch_size, num_keys, num_windows * num_heads, dim // num_heads).transpose(1, 2)


def unfold_windows(attn_output: torch.Tensor, num_heads: int) -> torch.Tensor:
    """An attention interface's output `(batch_size, window_area, num_windows * num_heads, head_dim)` (for the
    inputs of `fold_windows`) -> `(batch_size, num_windows * window_area, dim)`."""
    batch_size, window_area, folded, head_dim = attn_output.shape
    attn_output = attn_output.view(batch_size, window_area, folded // num_heads, num_heads, head_dim)
    return copy_as(attn_output.transpose(1, 2), batch_size, -1, num_heads * head_dim)


def split_heads(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_index: torch.Tensor, num_heads: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image's attention inputs: query `(num_windows * window_area, dim)`, key and value `(num_tokens, dim)` ->
    the query `(num_windows, num_heads, window_area, head_dim)` and the gathered keys and values `(num_windows,
    num_heads, num_keys, head_dim)` (strided views; one gather of whole rows each)."""
    num_windows, num_keys = key_index.shape
    head_dim = query.shape[-1] // num_heads
    query = query.view(num_windows, -1, num_heads, head_dim).transpose(1, 2)
    key, value = (
        source.index_select(0, key_index.flatten()).view(num_windows, num_keys, num_heads, head_dim).transpose(1, 2)
        for source in (key, value)
    )
    return query, key, value


def _cpu_gathered_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bias: torch.Tensor,
    key_index: torch.Tensor,
    num_heads: int,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over gathered keys on CPU, one image at a time, with PyTorch's fused (flash) CPU kernel.

    query `(batch_size, num_windows * window_area, dim)`, key and value `(batch_size, num_tokens, dim)`, bias
    `(num_windows, num_heads, window_area, num_keys)`, key_index `(num_windows, num_keys)` -> the output
    `(batch_size, num_windows * window_area, dim)` and its log-sum-exp `(batch_size, num_windows, num_heads,
    window_area)` (float32).
    """
    num_windows, _, window_area, _ = bias.shape
    key_index = key_index.contiguous()  # window by window (layouts store it key by key), once for every image
    output = torch.empty_like(query)
    logsumexp = query.new_empty(len(query), num_windows, num_heads, window_area, dtype=torch.float32)
    for image in range(len(query)):
        image_output, logsumexp[image] = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            *split_heads(query[image], key[image], value[image], key_index, num_heads), attn_mask=bias, scale=scaling
        )
        output[image].view(image_output.transpose(1, 2).shape).copy_(image_output.transpose(1, 2))
    return output, logsumexp


def _cpu_gathered_attention_backward(
    grad_output: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bias: torch.Tensor,
    key_index: torch.Tensor,
    output: torch.Tensor,
    logsumexp: torch.Tensor,
    num_heads: int,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `query`, `key`, `value` and `bias`, recomputing each image's gathered keys and attention
    matrix."""
    num_windows, num_keys = key_index.shape
    key_index = key_index.contiguous()  # (as in the forward pass)
    compute_dtype = torch.promote_types(query.dtype, torch.float32)  # low precision: recompute in float32
    grad_query = torch.empty_like(query)
    grad_key, grad_value = torch.empty_like(key), torch.empty_like(value)
    grad_bias = torch.zeros_like(bias, dtype=compute_dtype)
    grad_rows = key.new_empty(num_windows, num_keys, num_heads, query.shape[-1] // num_heads)
    for image in range(len(query)):
        image_query, keys, values = (
            tensor.to(compute_dtype).contiguous()
            for tensor in split_heads(query[image], key[image], value[image], key_index, num_heads)
        )
        image_output, image_grad = (
            tensor[image].view(num_windows, -1, num_heads, image_query.shape[-1]).transpose(1, 2).to(compute_dtype)
            for tensor in (output, grad_output)
        )
        scores = torch.matmul(image_query, keys.transpose(-1, -2)).mul_(scaling).add_(bias)
        probs = scores.sub_(logsumexp[image].unsqueeze(-1)).exp_()  # the forward's softmax
        grad_scores = torch.matmul(image_grad, values.transpose(-1, -2))
        grad_scores.sub_((image_grad * image_output).sum(-1, keepdim=True)).mul_(probs)
        grad_bias += grad_scores
        image_grad_query = torch.matmul(grad_scores, keys).mul_(scaling).transpose(1, 2)
        grad_query[image].view(image_grad_query.shape).copy_(image_grad_query)
        for grad_source, grad_gathered in (
            (grad_key, torch.matmul(grad_scores.transpose(-1, -2), image_query).mul_(scaling)),
            (grad_value, torch.matmul(probs.transpose(-1, -2), image_grad)),
        ):
            grad_rows.copy_(grad_gathered.transpose(1, 2))
            grad_source[image].zero_().index_add_(0, key_index.flatten(), grad_rows.view(num_windows * num_keys, -1))
    return grad_query, grad_key, grad_value, grad_bias.to(bias.dtype)


def register_gathered_attention(name: str, forward: Callable, backward: Callable):
    """`forward(query, key, value, bias, key_index, num_heads, scaling) -> (output, logsumexp)`, attention over keys
    gathered from `key` and `value` by `key_index`, as the PyTorch custom op `focal_transformer::{name}`,
    differentiated by `backward(grad_output, query, key, value, bias, key_index, output, logsumexp, num_heads, scaling)
    -> (grad_query, grad_key, grad_value, grad_bias)` (registered as `{name}_backward`): the inputs and both outputs
    are saved for it, the log-sum-exp's gradient is not used. For `torch.compile` the op is one node. Registered once
    per process (the same code may also be imported as Hub remote code): a name already registered is taken as it is,
    which is why an op's name changes with its signature."""
    if hasattr(torch.ops.focal_transformer, name):
        return getattr(torch.ops.focal_transformer, name)
    forward_op = custom_op(f"focal_transformer::{name}", mutates_args=())(forward)
    backward_op = custom_op(f"focal_transformer::{name}_backward", mutates_args=())(backward)

    @forward_op.register_fake
    def _(query, key, value, bias, key_index, num_heads, scaling):
        shape = (query.shape[0], bias.shape[0], num_heads, bias.shape[2])
        return torch.empty_like(query), query.new_empty(shape, dtype=torch.float32)

    @backward_op.register_fake
    def _(grad_output, query, key, value, bias, key_index, output, logsumexp, num_heads, scaling):
        return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value), torch.empty_like(bias)

    def setup_context(ctx, inputs, output):
        query, key, value, bias, key_index, ctx.num_heads, ctx.scaling = inputs
        ctx.save_for_backward(query, key, value, bias, key_index, *output)

    def differentiate(ctx, grad_output, grad_logsumexp):
        grads = backward_op(grad_output, *ctx.saved_tensors, ctx.num_heads, ctx.scaling)
        return *grads, None, None, None

    forward_op.register_autograd(differentiate, setup_context=setup_context)
    return getattr(torch.ops.focal_transformer, name)


# `cpu_gathered_attention(query, key, value, bias, key_index, num_heads, scaling) -> (output, logsumexp)`: the fused
# CPU kernel image by image on keys gathered from `key` and `value`; its backward pass recomputes the gathered keys
# and attention matrices rather than storing them, and differentiates the bias (the fused CPU kernel gives no bias
# gradient, so autograd would fall back to the unfused path and keep every attention matrix and gathered key). Its
# name is the second signature's (separate keys and values), so that a process that also imports older remote code,
# whose op takes them together under the first name, runs both.
cpu_gathered_attention = register_gathered_attention(
    CPU_ATTENTION_OP, _cpu_gathered_attention, _cpu_gathered_attention_backward
)


class TritonGatheredAttention(torch.autograd.Function):
    """The same attention on NVIDIA GPUs: the fused Triton kernels of `triton_attention` (forward and backward), on
    the queries, keys and values side by side as the `qkv` projection gives them (`joined_projections`), so that
    neither pass copies them and the backward pass gives their gradient as the projection's, in one buffer; the inputs
    and both outputs saved for the backward pass.

    A `torch.autograd.Function` that launches the kernels itself rather than a custom op (`torch.library.triton_op`):
    `focal_sdpa` runs it in eager mode only, where a GPU training step is bound by the host, and the op's dispatch and
    autograd layers cost the host about 100 µs more per block and call (`benchmarks/launch_cost.py`; Focal-T's
    training step 1.05x faster on an H200). `torch.compile` traces the function and its kernels as they are (checked
    on a GPU at one size: `benchmarks/test_gpu.py`)."""

    @staticmethod
    def forward(ctx, projections, bias, key_index, num_heads: int, scaling: float):
        output, logsumexp = fused_gathered_attention(projections, bias, key_index, num_heads, scaling)
        ctx.save_for_backward(projections, bias, key_index, output, logsumexp)
        ctx.num_heads, ctx.scaling = num_heads, scaling
        ctx.mark_non_differentiable(logsumexp)
        return output, logsumexp

    @staticmethod
    def backward(ctx, grad_output, grad_logsumexp):
        grads = fused_gathered_attention_backward(grad_output, *ctx.saved_tensors, ctx.num_heads, ctx.scaling)
        return *grads, None, None, None


# `triton_gathered_attention(projections, bias, key_index, num_heads, scaling) -> (output, logsumexp)`, where Triton
# is installed
triton_gathered_attention = None if fused_gathered_attention is None else TritonGatheredAttention.apply


def runs_triton_kernels(query: torch.Tensor, dropout: float) -> bool:
    """Whether `focal_sdpa` runs `triton_gathered_attention` for these queries: on an NVIDIA GPU of compute
    capability 8.0 or more (Ampere and later: what Triton supports), in bf16 or fp16 (as under autocast), without
    attention dropout, in eager mode (not while `torch.compile` or `torch.export` traces the model: exported
    programs hold only standard operators; compiled ones keep the folded call until the kernels' worth there is
    measured: they compile and pass a GPU test at one size), where Triton is installed; with autograd (training), or
    without it from `TRITON_MIN_INFERENCE_BATCH` images."""
    return (
        triton_gathered_attention is not None
        and query.dtype in (torch.bfloat16, torch.float16)
        and dropout == 0.0
        and not (torch.compiler.is_compiling() or is_exporting())
        and (torch.is_grad_enabled() or query.shape[0] >= TRITON_MIN_INFERENCE_BATCH)
        and triton_runs_on(query)
    )


def joined_projections(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Queries, keys and values side by side, `(batch_size, num_tokens, 3 * dim)`, as `triton_gathered_attention`
    takes them: the `qkv` projection's output where `query` (its first rows), `key` and `value` are its slices (as
    `FocalAttention` makes them; autograd then gives the projection its gradient directly), else their concatenation
    (rows padded with zeros to the longer of queries and keys), which is also what `torch.compile` traces (it cannot
    trace the comparison of storage offsets)."""
    # (the tensor the views share is the one `nn.Linear` computed, `(batch_size * num_tokens, 3 * dim)`)
    (batch_size, num_tokens, dim), base = key.shape, key._base
    if (
        not torch.compiler.is_compiling()
        and base is not None
        and query._base is base
        and value._base is base
        and base.is_contiguous()
        and base.numel() == batch_size * num_tokens * 3 * dim
        and query.stride() == key.stride() == value.stride() == (num_tokens * 3 * dim, 3 * dim, 1)
        and [t.storage_offset() - base.storage_offset() for t in (query, key, value)] == [0, dim, 2 * dim]
    ):
        return base.view(batch_size, num_tokens, 3 * dim)
    rows = max(query.shape[1], key.shape[1])
    return torch.cat([F.pad(tensor, (0, 0, 0, rows - tensor.shape[1])) for tensor in (query, key, value)], dim=-1)


def triton_runs_on(tensor: torch.Tensor) -> bool:
    """Whether the kernels run on `tensor`'s device: an NVIDIA GPU (not ROCm's) of compute capability 8.0 or more."""
    return tensor.is_cuda and torch.version.hip is None and torch.cuda.get_device_capability(tensor.device) >= (8, 0)


def focal_sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_index: torch.Tensor,
    attention_mask: torch.Tensor,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The default attention of Focal models, `attn_implementation="focal_sdpa"`: scaled-dot-product attention of
    every window over the keys and values it gathers from `key` and `value` by `key_index`, with `attention_mask` as
    additive bias.

    query `(batch_size, num_windows * window_area, dim)`, key and value `(batch_size, num_tokens, dim)`, key_index
    `(num_windows, num_keys)`, attention_mask `(num_windows, num_heads, window_area, num_keys)` -> the output
    `(batch_size, num_windows * window_area, dim)` and `None`.

    On CPU it runs `cpu_gathered_attention` (PyTorch's fused CPU kernel image by image, and a backward pass that
    recomputes the gathered keys and gives the bias gradient, so training keeps no attention matrix); on NVIDIA GPUs
    in bf16 and fp16 (`runs_triton_kernels`) `triton_gathered_attention` (fused Triton kernels: nothing gathered or
    materialised, one bias gradient summed over the batch); elsewhere, and while `torch.export` traces the model (so
    that exported programs hold only standard operators), one `torch.nn.functional.scaled_dot_product_attention`
    call with the windows folded into the head dimension (`folded_sdpa_attention`).

    Like transformers' `sdpa`, it computes no attention weights: with `output_attentions=True` it warns once and the
    model's `attentions` stay empty (`attn_implementation="eager"` gives them); in eager mode only (the warning
    would break a compiled graph).
    """
    if kwargs.get("output_attentions", False) and not torch.compiler.is_compiling():
        logger.warning_once(
            "`focal_sdpa` attention does not support `output_attentions=True`: no attention weights are returned."
            ' Load the model with `attn_implementation="eager"` for them.'
        )
    num_heads = attention_mask.shape[1]
    if runs_triton_kernels(query, dropout):
        projections = joined_projections(query, key, value)
        return triton_gathered_attention(projections, attention_mask, key_index, num_heads, scaling)[0], None
    if query.device.type == "cpu" and dropout == 0.0 and not is_exporting():
        return cpu_gathered_attention(query, key, value, attention_mask, key_index, num_heads, scaling)[0], None
    return folded_sdpa_attention(query, key, value, key_index, attention_mask, scaling, dropout), None


def folded_sdpa_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_index: torch.Tensor,
    bias: torch.Tensor,
    scaling: float,
    dropout: float = 0.0,
) -> torch.Tensor:
    """`focal_sdpa` off the CPU: one `torch.nn.functional.scaled_dot_product_attention` call on the windows folded
    into the head dimension (`fold_windows`), the bias broadcast over the batch. Shapes as `focal_sdpa_attention`.

    The gathered keys and values are several times the tokens. With autograd they are not kept for the backward
    pass: their sources `key` and `value` are, and they are gathered again when the backward pass needs them
    (`RegatheredKeys`; under `torch.compile`, the same by selective activation checkpointing, `recompute_folding`).
    A bf16 training step of Focal-T at batch 64 then holds an estimated 1.05x Swin-T's memory instead of 1.30x
    (`benchmarks/gpu_memory.py`). Where saved-tensor hooks are already in force (activation checkpointing, which
    keeps none of the block's tensors, or offloading them to the CPU), those decide instead
    (`outer_saved_tensors_hooks`)."""
    if torch.is_grad_enabled() and torch.compiler.is_compiling() and not is_exporting():
        return checkpoint(
            _folded_sdpa,
            query,
            key,
            value,
            key_index,
            bias,
            scaling,
            dropout,
            use_reentrant=False,
            context_fn=recompute_folding,
        )
    return _folded_sdpa(query, key, value, key_index, bias, scaling, dropout)


def _folded_sdpa(query, key, value, key_index, bias, scaling, dropout):
    num_heads = bias.shape[1]
    folded_query, folded_key, folded_value, folded_bias = fold_windows(query, key, value, key_index, bias)
    regather = torch.is_grad_enabled() and not torch.compiler.is_compiling() and not outer_saved_tensors_hooks()
    hooks = RegatheredKeys((folded_key, folded_value), (key, value), key_index, num_heads) if regather else None
    with hooks or contextlib.nullcontext():
        output = F.scaled_dot_product_attention(
            folded_query, folded_key, folded_value, attn_mask=folded_bias, dropout_p=dropout, scale=scaling
        )
    return unfold_windows(output.transpose(1, 2), num_heads)


def outer_saved_tensors_hooks() -> bool:
    """Whether saved-tensor hooks are in force here: `torch.utils.checkpoint` (transformers' activation
    checkpointing), `torch.autograd.graph.save_on_cpu` (its `offload=True`) or any other. Hooks entered inside them
    replace them for what is saved there (PyTorch applies only the innermost), so `RegatheredKeys` would keep the
    attention's saved tensors that a checkpoint would have dropped. Read through a private function of PyTorch
    (from 2.8); before that the answer is False."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is not None and top(False) is not None


class RegatheredKeys(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks under which autograd keeps, in place of the gathered keys and values, their sources (a
    fraction of their size), and gathers them again (`gather_keys`) when the backward pass unpacks them; they are
    freed after that use. Only these tensors are replaced: anything else is saved as usual."""

    def __init__(self, gathered, sources, key_index: torch.Tensor, num_heads: int):
        # (weak references: autograd keeps the hooks as long as what they packed)
        replaced = [
            (weakref.ref(tensor), (source, source._version, key_index, num_heads))
            for tensor, source in zip(gathered, sources, strict=True)
        ]

        def pack(tensor):
            for reference, source in replaced:
                if tensor is reference():
                    return source
            return tensor

        super().__init__(pack, _unpack_regathered)


def _unpack_regathered(packed):
    if isinstance(packed, torch.Tensor):
        return packed
    source, version, key_index, num_heads = packed
    if source._version != version:
        raise RuntimeError(
            "The keys and values of a focal attention call are gathered again for the backward pass, but their "
            f"source was modified in place after the forward pass (version {version}, now {source._version})."
        )
    return gather_keys(source, key_index, num_heads)


def _store_attention_kernels_only(context, operator, *args, **kwargs) -> CheckpointPolicy:
    if operator.name().startswith(
        ("aten::_scaled_dot_product_", "aten::_efficient_attention", "aten::_flash_attention")
    ):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def recompute_folding():
    """The selective-checkpointing contexts of `folded_sdpa_attention` under `torch.compile`: the outputs of a fused
    attention kernel (memory-efficient, flash, cuDNN, ...) are stored, everything else is recomputed in the backward
    pass: the folding (copies and the gather), and, where PyTorch has no fused kernel for the case and SDPA runs as
    separate operators, the attention itself."""
    return create_selective_checkpoint_contexts(_store_attention_kernels_only)


focal_sdpa_attention.gathers_keys = True
AttentionInterface.register("focal_sdpa", focal_sdpa_attention)


class FocalPoolingWeights(nn.Module):
    """`fc` pooling of one level: a learned weighted sum of each sub-window's tokens, shared by the channels,
    `(batch_size, grid_h, size, grid_w, size, channels)` -> `(batch_size, grid_h, grid_w, channels)`. Its weight
    `(1, size * size)` and bias `(1,)` are the official `nn.Linear(size * size, 1)`'s; it is not an `nn.Linear`
    (which it does not apply over the channels), so that tools that replace or adapt every linear layer (PEFT's
    `target_modules="all-linear"`, quantization) leave it alone."""

    def __init__(self, size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(1, size * size))
        self.bias = nn.Parameter(torch.empty(1))

    def forward(self, sub_windows: torch.Tensor) -> torch.Tensor:
        size = sub_windows.shape[2]
        return (sub_windows * self.weight.view(size, 1, size, 1)).sum((2, 4)) + self.bias


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
            self.pool_layers = nn.ModuleList(FocalPoolingWeights(size) for size in sizes)
        elif self.pool_method == "conv":
            self.pool_layers = nn.ModuleList(nn.Conv2d(dim, dim, size, stride=size, groups=dim) for size in sizes)
        else:
            self.pool_layers = None

    def pool_level(self, hidden_states: torch.Tensor, level: int) -> torch.Tensor:
        """`(batch_size, height, width, channels)` -> `(batch_size, grid_h * 2**level, grid_w * 2**level, channels)`."""
        size = pooled_window_size(self.window_size, level)
        batch_size, height, width, channels = hidden_states.shape
        target_h = height // self.window_size * 2**level * size
        target_w = width // self.window_size * 2**level * size
        if 2**level * size != self.window_size:  # 2**level sub-windows are smaller than a window: trim centrally
            trim_h, trim_w = height - target_h, width - target_w
            padding = (0, 0, -(trim_w // 2), trim_w // 2 - trim_w, -(trim_h // 2), trim_h // 2 - trim_h)
            hidden_states = F.pad(hidden_states, padding)
        if self.pool_method == "fc":  # a weighted sum of each sub-window's tokens
            sub_windows = hidden_states.view(batch_size, target_h // size, size, target_w // size, size, channels)
            return self.pool_layers[level](sub_windows)
        spatial = channels_first(hidden_states)
        if self.pool_method == "mean":
            pooled = F.avg_pool2d(spatial, size)
        elif self.pool_method == "max":
            pooled = F.max_pool2d(spatial, size)
        else:
            pooled = self.pool_layers[level](spatial)
        return pooled.permute(0, 2, 3, 1)

    def forward(self, hidden_states: torch.Tensor) -> list[torch.Tensor]:
        return [self.pool_level(hidden_states, level) for level in range(self.num_levels)]


def autocast_enabled(device: torch.device) -> bool:
    """Whether autocast is on for `device`'s type. (Devices without autocast, such as `meta`, are asked first in eager
    mode only: dynamo before torch 2.12 cannot trace `is_autocast_available`.)"""
    available = torch.compiler.is_compiling() or torch.amp.is_autocast_available(device.type)
    return available and torch.is_autocast_enabled(device.type)


def autocast_input(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` in the dtype that autocast, where it is enabled, gives the inputs of matrix products (cast before it
    is copied, so that the copy moves fewer bytes). Itself otherwise."""
    if autocast_enabled(tensor.device):
        return tensor.to(torch.get_autocast_dtype(tensor.device.type))
    return tensor


def without_autocast(device: torch.device):
    """A context with autocast off for `device`'s type where it is on; nothing otherwise."""
    return torch.autocast(device.type, enabled=False) if autocast_enabled(device) else contextlib.nullcontext()


class FocalAttentionBase(nn.Module):
    """What both focal attentions share: each window's queries attend keys gathered from the fine-grained and pooled
    maps by the block's key layout, with an additive bias (position bias and masks); subclasses define the layout
    and the position bias.

    Takes the padded, shifted map `(batch_size, height, width, dim)`, its pooled maps and the block's key layout on
    the unpadded map (`key_layout`); returns `(batch_size, height, width, dim)` and, for eager attention, the
    probabilities `(batch_size * num_windows, num_heads, window_size**2, num_keys)`.

    `layout_spec` (set by subclasses): the layout's builder and its arguments after the map's height and width. Blocks
    of one stage whose specs are equal share one layout (`FocalStage`).
    """

    layout_spec: tuple[Callable, tuple]

    def __init__(self, config: FocalConfig, dim: int, num_heads: int, geometry: FocalBlockGeometry):
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
        self._cached_bias = None  # (layout, dtype, parameter state, their values on CPU, bias): cached_attention_bias

    def key_layout(self, height, width, device: torch.device):
        """The key layout on a `height x width` map (before padding to whole windows)."""
        builder, args = self.layout_spec
        return key_layout(builder, (height, width, *args), device)

    def position_bias(self, layout) -> torch.Tensor:
        """Position bias of the layout's real keys (before alignment padding), `(num_windows or 1, num_heads,
        window_size**2, num_real_keys)`."""
        raise NotImplementedError

    def attention_bias(self, layout) -> torch.Tensor:
        """The additive attention bias `(num_windows, num_heads, window_size**2, num_keys)`: position bias and mask."""
        bias = self.position_bias(layout)
        bias = F.pad(bias, (0, layout.key_index.shape[1] - bias.shape[-1]))
        return bias + layout.key_mask[:, None].to(bias.dtype)

    def cached_attention_bias(self, layout, dtype: torch.dtype) -> torch.Tensor:
        """`attention_bias(layout)` in `dtype`. In eager mode without autograd (inference, also image chunk by image
        chunk), the last one is kept and reused while the layout, the dtype and the position-bias parameters are the
        same: the same memory, not changed in place since (PyTorch's version counters, read on the host), and on
        CPU also the same values (compared with a copy: they are small, the bias is not), which catches even an
        in-place change made through `.data`, which PyTorch does not count. On other devices the values are not
        compared, since each comparison would wait for the device (a host synchronisation per block); there a
        weight changed through `.data` needs `torch.no_grad()` and an in-place operation on the parameter itself
        instead (as optimizers, `load_state_dict` and `transformers.initialization` do), and weights created under
        `torch.inference_mode()`, which have no version counter, are not cached. Nor are weights held by tensor
        subclasses (quantized position-bias MLPs of Focal-fast), whose memory and values these checks cannot read."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self.attention_bias(layout).to(dtype)
        parameters = [p for name, p in self.named_parameters() if not name.startswith(("qkv.", "proj."))]
        if any(type(p) not in (nn.Parameter, torch.Tensor) for p in parameters):
            return self.attention_bias(layout).to(dtype)
        on_cpu = layout.key_index.device.type == "cpu"
        state = [
            (p.device, p.dtype, p.shape, p.data_ptr(), None if p.is_inference() else p._version) for p in parameters
        ]
        cached = self._cached_bias
        if (
            cached is not None
            and cached[0] is layout
            and cached[1] == dtype
            and cached[2] == state
            and (
                all(torch.equal(p, c) for p, c in zip(parameters, cached[3], strict=True))
                if on_cpu
                else all(version is not None for *_, version in state)
            )
        ):
            return cached[4]
        bias = self.attention_bias(layout).to(dtype)
        self._cached_bias = (layout, dtype, state, [p.detach().clone() for p in parameters] if on_cpu else None, bias)
        return bias

    def forward(
        self,
        hidden_states: torch.Tensor,
        pooled_states: list[torch.Tensor],
        layout: FocalKeyLayout | FocalFastKeyLayout,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size, height, width, dim = hidden_states.shape
        # the fine tokens window by window, then the pooled tokens: their keys and values are the source that each
        # window gathers its keys and values from (`layout.key_index`), the fine tokens' queries are the queries.
        # `qkv` is one standard call of a standard `nn.Linear` (so that adapters such as PEFT's LoRA and quantized
        # layers that replace it work). Under autocast the tokens are cast before they are reordered: the copies
        # then move half the bytes.
        fine = window_partition(autocast_input(hidden_states), self.geometry.window_size)
        tokens = torch.cat([fine] + [autocast_input(pooled.flatten(1, 2)) for pooled in pooled_states], dim=1)
        query, key, value = self.qkv(tokens).split(dim, dim=-1)
        query = query[:, : fine.shape[1]]
        bias = self.cached_attention_bias(layout, query.dtype)
        attn_output, attn_weights = self.attend(query, key, value, layout.key_index, bias, **kwargs)
        attn_output = self.proj_dropout(self.proj(attn_output))
        return window_reverse(attn_output, self.geometry.window_size, height, width), attn_weights

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_index: torch.Tensor,
        bias: torch.Tensor,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The attention through the configured attention function: query `(batch_size, num_windows * window_area,
        dim)`, key and value `(batch_size, num_tokens, dim)`, key_index `(num_windows, num_keys)`, bias
        `(num_windows, num_heads, window_area, num_keys)` -> the output `(batch_size, num_windows * window_area, dim)`
        and, if the function returns them (eager), the weights `(batch_size * num_windows, num_heads, window_area,
        num_keys)`.

        An attention function that gathers the keys itself (`focal_sdpa_attention`) gets the keys' and values'
        sources; any other (eager, sdpa, or one registered with transformers' `AttentionInterface`) gets one
        call with the windows folded into the head dimension (`fold_windows`)."""
        dropout = self.attention_dropout if self.training else 0.0
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        if getattr(attention_interface, "gathers_keys", False):
            return attention_interface(
                self, query, key, value, key_index, bias, scaling=self.scaling, dropout=dropout, **kwargs
            )
        query, key, value, bias = fold_windows(query, key, value, key_index, bias)
        attn_output, attn_weights = attention_interface(
            self, query, key, value, bias, dropout=dropout, scaling=self.scaling, **kwargs
        )
        if attn_weights is not None and attn_weights.shape[1] != self.num_heads:  # (not eager_attention_forward's)
            # an interface's weights of the folded windows (batch_size, num_windows * num_heads, ...) ->
            # (batch_size * num_windows, num_heads, ...)
            attn_weights = attn_weights.unflatten(1, (-1, self.num_heads)).flatten(0, 1)
        return unfold_windows(attn_output, self.num_heads), attn_weights


class FocalPooledBiasTables(nn.ParameterList):
    """The relative position bias tables to each pooled level's neighbourhood, `(num_heads, num_positions)` each,
    called as a module (so that offloading hooks load them) with the attention's other tables: all of them side by
    side, `(num_heads, total_positions)`."""

    __call__ = nn.Module.__call__  # (a plain ParameterList refuses to be called)

    def forward(self, other_tables: list[torch.Tensor]) -> torch.Tensor:
        # (by index: dynamo before torch 2.12 cannot unpack a ParameterList's generator)
        return torch.cat(other_tables + [self[level] for level in range(len(self))], dim=1)


class FocalSelfAttention(FocalAttentionBase):
    """Focal self-attention (official `focal`): a window's own tokens, its expanded surroundings and a neighbourhood
    of pooled windows per coarse level, each with a learned relative position bias table."""

    def __init__(self, config: FocalConfig, dim: int, num_heads: int, geometry: FocalBlockGeometry):
        super().__init__(config, dim, num_heads, geometry)
        self.layout_spec = (focal_key_layout, (geometry,))
        window_size = geometry.window_size
        window_area = window_size * window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        if geometry.has_neighbors:
            num_neighbors = 4 * window_area - 4 * (window_size - geometry.expand_size) ** 2
            self.relative_position_bias_table_to_neighbors = nn.Parameter(
                torch.zeros(1, num_heads, window_area, num_neighbors)
            )
        else:
            self.relative_position_bias_table_to_neighbors = None
        self.relative_position_bias_table_to_windows = FocalPooledBiasTables(
            nn.Parameter(torch.zeros(num_heads, (window_size + side - 1) ** 2)) for side in self._pooled_sides()
        )
        for name, index in self._index_buffers().items():
            self.register_buffer(name, index, persistent=False)

    def _pooled_sides(self) -> list[int]:
        return [
            pooled_neighborhood(self.geometry.focal_window, level)[0]
            for level in range(self.geometry.num_pooled_levels)
        ]

    def _index_buffers(self) -> dict[str, torch.Tensor]:
        """The static index into the bias tables (not saved; `_init_weights` recomputes it), `position_bias_index`
        `(window_size**2, num_real_keys, slots_per_key)`: for each query and key, the positions of its official slots
        in the tables side by side (`FocalPooledBiasTables`: the table within the window, the one to the
        surroundings, then each pooled level's), padded with the position of a -inf after them. A fine key stands for
        one or two slots (`fine_keys`), a pooled key for one."""
        window_size = self.geometry.window_size
        window_area = window_size**2
        within = relative_position_index(window_size, window_size)  # window_area, window_area
        num_neighbors = 0
        if self.relative_position_bias_table_to_neighbors is not None:
            num_neighbors = self.relative_position_bias_table_to_neighbors.shape[-1]
        # the position of every (query, official fine slot): within the window, then to the surroundings
        offset = (2 * window_size - 1) ** 2
        to_neighbors = offset + torch.arange(window_area * num_neighbors).view(window_area, num_neighbors)
        fine_slots = torch.cat([within, to_neighbors], dim=1)
        offset += window_area * num_neighbors
        keys = [[fine_slots[:, slot] for slot in group] for group in fine_keys(self.geometry)[1]]
        for side in self._pooled_sides():
            to_windows = relative_position_index(window_size, side)  # window_area, side**2
            keys += [[offset + to_windows[:, key]] for key in range(side**2)]
            offset += (window_size + side - 1) ** 2
        width = max(len(slots) for slots in keys)
        padding = torch.full((window_area,), offset)  # the -inf after the tables
        index = [torch.stack(slots + [padding] * (width - len(slots)), dim=-1) for slots in keys]
        return {"position_bias_index": torch.stack(index, dim=1)}

    def reset_index_buffers(self) -> None:
        """Recompute the index buffers (`from_pretrained` builds models on the meta device)."""
        for name, index in self._index_buffers().items():
            init.copy_(getattr(self, name), index)

    def position_bias(self, layout: FocalKeyLayout) -> torch.Tensor:
        """The same for every window: `(1, num_heads, window_size**2, num_real_keys)`, one gather from the tables side
        by side (`position_bias_index`). A fine key standing for two official slots (`fine_keys`) gets the
        log-sum-exp of their biases: `exp(s + a) + exp(s + b) = exp(s + log(exp(a) + exp(b)))`."""
        tables = [self.relative_position_bias_table.t()]
        if self.relative_position_bias_table_to_neighbors is not None:
            tables.append(self.relative_position_bias_table_to_neighbors.view(self.num_heads, -1))
        tables = F.pad(self.relative_position_bias_table_to_windows(tables), (0, 1), value=float("-inf"))
        index = self.position_bias_index
        bias = tables.index_select(1, index.flatten()).view(self.num_heads, *index.shape)
        bias = bias.logsumexp(-1) if index.shape[-1] > 1 else bias.squeeze(-1)
        return bias[None]


class FocalFastSelfAttention(FocalAttentionBase):
    """Focal-fast attention (official `focalv2`): per focal level, the `focal_topk` tokens nearest to the window,
    with a position bias computed by a small MLP (one per level) from the query-to-key offsets."""

    def __init__(self, config: FocalConfig, dim: int, num_heads: int, geometry: FocalBlockGeometry):
        super().__init__(config, dim, num_heads, geometry)
        self.layout_spec = (focal_fast_key_layout, (geometry.window_size, geometry.focal_level, config.focal_topk))
        self.relative_position_mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(2, self.head_dim), nn.ReLU(), nn.Linear(self.head_dim, num_heads))
            for _ in range(geometry.focal_level)
        )

    def position_bias(self, layout: FocalFastKeyLayout) -> torch.Tensor:
        """Each level's MLP on every offset of the map, read per (window, query, key) in one gather: `(num_windows,
        num_heads, window_size**2, num_real_keys)`. The MLPs run in their weights' dtype also under autocast: tiny
        products, where autocast's casts (five a level, and their gradients' four) would cost more than they save."""
        coords = layout.coords.to(self.relative_position_mlps[0][0].weight.dtype)
        with without_autocast(coords.device):
            bias = torch.cat([mlp(coords) for mlp in self.relative_position_mlps])  # levels * num_coords, num_heads
        index = layout.coord_index
        bias = bias.index_select(0, index.flatten()).view(*index.shape, self.num_heads)
        return bias.permute(0, 3, 1, 2).clone(memory_format=torch.contiguous_format)


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
    """One Focal Transformer block: `(batch_size, height * width, dim)` on a `height x width` map, with its attention's
    key layout on that map (`FocalAttentionBase.key_layout`) -> same shape, and its attention weights."""

    def __init__(
        self,
        config: FocalConfig,
        dim: int,
        num_heads: int,
        geometry: FocalBlockGeometry,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        self.geometry = geometry
        self.layernorm_before = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.window_pooling = FocalWindowPooling(geometry, dim) if geometry.num_pooled_levels else None
        self.attention = FOCAL_ATTENTION_CLASSES[config.attention_type](config, dim, num_heads, geometry)
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
        layout: FocalKeyLayout | FocalFastKeyLayout,
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
                outputs = [self.block(part, input_dimensions, layout, **kwargs) for part in hidden_states.split(chunk)]
                weights = [weights for _, weights in outputs if weights is not None]
                return torch.cat([output for output, _ in outputs]), torch.cat(weights) if weights else None
        return self.block(hidden_states, input_dimensions, layout, **kwargs)

    def block(
        self,
        hidden_states: torch.Tensor,
        input_dimensions: tuple[int, int],
        layout: FocalKeyLayout | FocalFastKeyLayout,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The block on `hidden_states` `(batch_size, height * width, dim)`: its output and attention weights."""
        height, width = input_dimensions
        batch_size, _, channels = hidden_states.shape
        window_size, shift_size = self.geometry.window_size, self.geometry.shift_size
        shortcut = hidden_states

        hidden_states = self.layernorm_before(hidden_states).view(batch_size, height, width, channels)
        # pad to whole windows (right and bottom), then shift cyclically (SW-MSA)
        pad_h = ceil_div(height, window_size) * window_size - height  # (whole windows, also for symbolic sizes)
        pad_w = ceil_div(width, window_size) * window_size - width
        if not known_zero(pad_h, pad_w):
            hidden_states = F.pad(hidden_states, (0, 0, 0, pad_w, 0, pad_h))
        if shift_size:
            hidden_states = torch.roll(hidden_states, shifts=(-shift_size, -shift_size), dims=(1, 2))
        pooled_states = self.window_pooling(hidden_states) if self.window_pooling is not None else []

        attention_output, attn_weights = self.attention(hidden_states, pooled_states, layout, **kwargs)

        if shift_size:
            attention_output = torch.roll(attention_output, shifts=(shift_size, shift_size), dims=(1, 2))
        if not known_zero(pad_h, pad_w):
            attention_output = F.pad(attention_output, (0, 0, 0, -pad_w, 0, -pad_h))  # a fresh, contiguous crop
        attention_output = attention_output.reshape(batch_size, height * width, channels)
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

    Blocks whose key layouts are alike (`layout_spec`: all of a stage's blocks, but for Focal's shifted and unshifted
    ones) share one, built by the first of them (`layout_sources`): in eager mode a lookup less per block, traced
    (`torch.export`, `torch.compile`), where the layouts are computed in the graph for each input, a third of the
    layout operators for Focal-T (4 layouts instead of 12).
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
                drop_path[block],
            )
            for block in range(config.depths[stage])
        )
        specs = [block.attention.layout_spec for block in self.blocks]
        self.layout_sources = [specs.index(spec) for spec in specs]  # the first block with each block's spec
        is_last = stage == len(config.depths) - 1
        self.downsample = None if is_last else FocalPatchEmbeddings(config, dim, 2 * dim, is_stem=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        input_dimensions: tuple[int, int],
        output_maps: bool = False,
        output_hidden_states_before_downsampling: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, tuple[int, int]]:
        height, width = input_dimensions
        attn_weights, layouts = None, []
        for block, source in zip(self.blocks, self.layout_sources, strict=True):
            if source < len(layouts):
                layouts.append(layouts[source])
            else:
                layouts.append(block.attention.key_layout(height, width, hidden_states.device))
            hidden_states, attn_weights = block(hidden_states, input_dimensions, layouts[-1], **kwargs)

        batch_size, _, channels = hidden_states.shape
        spatial = channels_first(hidden_states.view(batch_size, height, width, channels))
        reshaped = spatial if output_maps else None
        output_dimensions = input_dimensions
        if self.downsample is not None:
            hidden_states, output_dimensions = self.downsample(spatial)
            if output_maps and not output_hidden_states_before_downsampling:
                reshaped = copy_as(hidden_states.transpose(1, 2), batch_size, -1, *output_dimensions)
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

    def get_correct_attn_implementation(self, requested_attention: str | None, is_init_check: bool = False) -> str:
        """Focal models default to `"focal_sdpa"` (`focal_sdpa_attention`) rather than transformers' `"sdpa"`."""
        return super().get_correct_attn_implementation(requested_attention or "focal_sdpa", is_init_check)

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
        elif isinstance(module, FocalPoolingWeights):
            init.constant_(module.weight, 1.0 / module.weight.shape[-1])
            init.zeros_(module.bias)
        elif isinstance(module, FocalSelfAttention):
            init.trunc_normal_(module.relative_position_bias_table, std=std)
            if module.relative_position_bias_table_to_neighbors is not None:
                init.trunc_normal_(module.relative_position_bias_table_to_neighbors, std=std)
            for table in module.relative_position_bias_table_to_windows:
                init.trunc_normal_(table, std=std)
            module.reset_index_buffers()
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
        if pixel_values.shape[0] == 0:
            raise ValueError(f"{expected} and batch_size >= 1, got an empty batch {tuple(pixel_values.shape)}.")


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
            if is_exporting():
                warn_if_one_window_example(self.config, input_dimensions, stage.blocks[0].geometry.window_size)
            hidden_states, reshaped, _, input_dimensions = stage(
                hidden_states,
                input_dimensions,
                output_maps=output_hidden_states,
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

    def get_input_embeddings(self) -> nn.Conv2d:
        """The stem's projection of the pixels: its output is the tensor that `enable_input_require_grads` (called by
        PEFT for a model with gradient checkpointing on) makes require a gradient."""
        return self.embeddings.patch_embeddings.projection

    @can_return_tuple
    @auto_docstring
    @exportable_at_any_size
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
        # as transformers' ViT family: e.g. fp16 or fp64 input to an fp32 model
        pixel_values = pixel_values.to(self.embeddings.patch_embeddings.projection.weight.dtype)
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
            pooled_output = sequence_output.mean(1)
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
    # a classification folder's head and final norm have no place here; its missing per-stage `hidden_states_norms`
    # are reported as newly initialised, as for Swin's backbone
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
