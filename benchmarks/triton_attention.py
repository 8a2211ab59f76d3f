"""A candidate for the GPU path of `focal_sdpa`: attention over gathered keys as two fused Triton kernels, to be
measured on a GPU against the folded SDPA call before it replaces anything (`ablation.py --attention focal_triton`,
which `gpu_check.sh` runs).

Importing this module registers `attn_implementation="focal_triton"` with transformers' `AttentionInterface`. It
takes what `focal_sdpa` takes (the keys' and values' sources, the key index and the per-window bias) and computes
the same attention in one kernel per direction, with nothing materialised in between:

- forward, a program per (window, head, image): the window's queries, its keys and values read row by row from the
  sources through the key index (no gathered copy), the bias tile read once from the `(num_windows, num_heads,
  window_area, num_keys)` table, the softmax in float32 in registers, the output written in the queries' own layout
  `(batch_size, num_windows * window_area, dim)` (no folding copy) with its log-sum-exp;
- backward, a program per (window, head, block of keys, group of images): the attention matrix recomputed from the
  log-sum-exp, the gradients of queries, keys and values added into the queries' and the sources' rows (float32
  atomic adds: no gathered gradient and no `index_add_`), the bias gradient summed over the group's images in
  registers and added once (no per-image bias gradient).

A window's keys fit one forward block (at most 256 keys and 64 queries: every official configuration at a window of 7);
larger layouts, dropout, and `torch.export` fall back to `focal_sdpa`. On CPU it runs only under Triton's interpreter
(`TRITON_INTERPRET=1`, as `tests/test_triton_attention.py` checks it against eager attention); elsewhere on CPU it
falls back to `focal_sdpa` too. On the meta device the op's fake implementation gives the shapes of its outputs
(`gpu_memory.py --attention focal_triton` estimates the memory and bytes of a training step with it).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton
from transformers import AttentionInterface

from focal_hf.modeling_focal import focal_sdpa_attention

MAX_QUERIES, MAX_KEYS = 64, 256  # one block each
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # (as Triton decided when this module's kernels were made)
# Triton's interpreter (3.9) multiplies bfloat16 tiles as integers: interpreted, the products are taken in float32,
# which gives what a GPU gives (bfloat16 products are exact in float32 and accumulated in float32 there too)
DOT_IN_FLOAT32 = tl.constexpr(INTERPRETED)
BACKWARD_KEY_BLOCK = 64  # keys per backward program (its float32 tiles then stay in registers)
PROGRAMS_PER_SM = 8  # backward: how many (window, head, key block, image group) programs to aim for per multiprocessor


@triton.jit
def _tile(first, rows, row_stride, columns, row_ok, column_ok):
    """Offsets and mask of the `rows x columns` tile of a row-major matrix whose first element is at offset
    `first`."""
    return first + rows[:, None] * row_stride + columns[None, :], row_ok[:, None] & column_ok[None, :]


@triton.jit
def _dot(left, right, PRECISION: tl.constexpr):
    """`left @ right` in float32."""
    if DOT_IN_FLOAT32:
        left, right = left.to(tl.float32), right.to(tl.float32)
    return tl.dot(left, right, input_precision=PRECISION)


@triton.jit
def _scores(query, keys, bias, key_ok, scaling, PRECISION: tl.constexpr):
    """The logits `(queries, keys)` in float32, -inf on the block's keys past the layout's."""
    scores = _dot(query, tl.trans(keys), PRECISION) * scaling + bias
    return tl.where(key_ok[None, :], scores, float("-inf"))


@triton.jit
def _gathered_attention_forward(
    query_ptr,
    key_ptr,
    value_ptr,
    bias_ptr,
    key_index_ptr,
    output_ptr,
    logsumexp_ptr,
    index_window_stride,
    index_key_stride,
    num_heads,
    window_area,
    num_keys,
    num_tokens,
    head_dim,
    scaling,
    BLOCK_A: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    window_head = tl.program_id(0)
    image = tl.program_id(1).to(tl.int64)
    num_windows = tl.num_programs(0) // num_heads
    window, head = window_head // num_heads, window_head % num_heads
    dim = num_heads * head_dim
    rows, keys, dims = tl.arange(0, BLOCK_A), tl.arange(0, BLOCK_K), tl.arange(0, BLOCK_D)
    row_ok, key_ok, dim_ok = rows < window_area, keys < num_keys, dims < head_dim
    columns = head * head_dim + dims
    index = tl.load(key_index_ptr + window * index_window_stride + keys * index_key_stride, mask=key_ok, other=0)
    queries_at, query_mask = _tile(
        image * num_windows * window_area * dim + window * window_area * dim, rows, dim, columns, row_ok, dim_ok
    )
    keys_at, key_mask = _tile(image * num_tokens * dim, index, dim, columns, key_ok, dim_ok)
    bias_at, bias_mask = _tile(window_head * window_area * num_keys, rows, num_keys, keys, row_ok, key_ok)
    query = tl.load(query_ptr + queries_at, mask=query_mask, other=0.0)
    keys_tile = tl.load(key_ptr + keys_at, mask=key_mask, other=0.0)
    bias = tl.load(bias_ptr + bias_at, mask=bias_mask, other=0.0).to(tl.float32)
    scores = _scores(query, keys_tile, bias, key_ok, scaling, PRECISION)

    maximum = tl.max(scores, 1)
    probs = tl.exp(scores - maximum[:, None])
    total = tl.sum(probs, 1)
    probs = probs / total[:, None]
    values = tl.load(value_ptr + keys_at, mask=key_mask, other=0.0)
    output = _dot(probs.to(values.dtype), values, PRECISION)

    tl.store(output_ptr + queries_at, output.to(output_ptr.dtype.element_ty), mask=query_mask)
    logsumexp_at = ((image * num_windows + window) * num_heads + head) * window_area
    tl.store(logsumexp_ptr + logsumexp_at + rows, maximum + tl.log(total), mask=row_ok)


@triton.jit
def _gathered_attention_backward(
    grad_output_ptr,
    query_ptr,
    key_ptr,
    value_ptr,
    bias_ptr,
    key_index_ptr,
    output_ptr,
    logsumexp_ptr,
    grad_query_ptr,
    grad_key_ptr,
    grad_value_ptr,
    grad_bias_ptr,
    index_window_stride,
    index_key_stride,
    num_heads,
    window_area,
    num_keys,
    num_tokens,
    head_dim,
    scaling,
    batch_size,
    images_per_program,
    BLOCK_A: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    num_key_blocks = tl.cdiv(num_keys, BLOCK_K)
    window_head, key_block = tl.program_id(0) // num_key_blocks, tl.program_id(0) % num_key_blocks
    num_windows = tl.num_programs(0) // (num_key_blocks * num_heads)
    window, head = window_head // num_heads, window_head % num_heads
    dim = num_heads * head_dim
    rows, keys, dims = tl.arange(0, BLOCK_A), key_block * BLOCK_K + tl.arange(0, BLOCK_K), tl.arange(0, BLOCK_D)
    row_ok, key_ok, dim_ok = rows < window_area, keys < num_keys, dims < head_dim
    columns = head * head_dim + dims
    index = tl.load(key_index_ptr + window * index_window_stride + keys * index_key_stride, mask=key_ok, other=0)
    bias_at, bias_mask = _tile(window_head * window_area * num_keys, rows, num_keys, keys, row_ok, key_ok)
    bias = tl.load(bias_ptr + bias_at, mask=bias_mask, other=0.0).to(tl.float32)
    grad_bias = tl.zeros((BLOCK_A, BLOCK_K), dtype=tl.float32)

    first = tl.program_id(1).to(tl.int64) * images_per_program
    for image in range(first, tl.minimum(first + images_per_program, batch_size)):
        queries_at, query_mask = _tile(
            image * num_windows * window_area * dim + window * window_area * dim, rows, dim, columns, row_ok, dim_ok
        )
        keys_at, key_mask = _tile(image * num_tokens * dim, index, dim, columns, key_ok, dim_ok)
        query = tl.load(query_ptr + queries_at, mask=query_mask, other=0.0)
        keys_tile = tl.load(key_ptr + keys_at, mask=key_mask, other=0.0)
        values = tl.load(value_ptr + keys_at, mask=key_mask, other=0.0)
        grad_output = tl.load(grad_output_ptr + queries_at, mask=query_mask, other=0.0)
        output = tl.load(output_ptr + queries_at, mask=query_mask, other=0.0)
        logsumexp_at = ((image * num_windows + window) * num_heads + head) * window_area
        logsumexp = tl.load(logsumexp_ptr + logsumexp_at + rows, mask=row_ok, other=0.0)

        probs = tl.exp(_scores(query, keys_tile, bias, key_ok, scaling, PRECISION) - logsumexp[:, None])
        delta = tl.sum(grad_output.to(tl.float32) * output.to(tl.float32), 1)
        grad_probs = _dot(grad_output, tl.trans(values), PRECISION)
        grad_scores = probs * (grad_probs - delta[:, None])
        grad_bias += grad_scores

        grad_scores_low = grad_scores.to(query.dtype)
        grad_query = _dot(grad_scores_low, keys_tile, PRECISION) * scaling
        tl.atomic_add(grad_query_ptr + queries_at, grad_query, mask=query_mask, sem="relaxed")
        grad_keys = _dot(tl.trans(grad_scores_low), query, PRECISION) * scaling
        tl.atomic_add(grad_key_ptr + keys_at, grad_keys, mask=key_mask, sem="relaxed")
        grad_values = _dot(tl.trans(probs.to(grad_output.dtype)), grad_output, PRECISION)
        tl.atomic_add(grad_value_ptr + keys_at, grad_values, mask=key_mask, sem="relaxed")

    tl.atomic_add(grad_bias_ptr + bias_at, grad_bias, mask=bias_mask, sem="relaxed")


def fits(bias: torch.Tensor) -> bool:
    """Whether a layout's windows (bias `(num_windows, num_heads, window_area, num_keys)`) fit one block."""
    return bias.shape[2] <= MAX_QUERIES and bias.shape[3] <= MAX_KEYS


def _launch_arguments(query, key, bias, key_index, num_heads: int, key_block: int | None = None):
    """The kernels' size arguments and block sizes: a block of `key_block` keys, else all the window's keys."""
    num_windows, _, window_area, num_keys = bias.shape
    head_dim = query.shape[-1] // num_heads
    block_keys = max(16, triton.next_power_of_2(min(key_block or num_keys, num_keys)))
    blocks = {
        "BLOCK_A": max(16, triton.next_power_of_2(window_area)),
        "BLOCK_K": block_keys,
        "BLOCK_D": max(16, triton.next_power_of_2(head_dim)),
        "PRECISION": "ieee" if query.dtype == torch.float32 else "tf32",  # (float32: no TF32 rounding)
        "num_warps": 4 if block_keys <= 128 else 8,
    }
    sizes = (*key_index.stride(), num_heads, window_area, num_keys, key.shape[1], head_dim)
    return num_windows, -(-num_keys // block_keys), sizes, blocks


@triton_op("focal_transformer::triton_gathered_attention", mutates_args=())
def triton_gathered_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bias: torch.Tensor,
    key_index: torch.Tensor,
    num_heads: int,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """query `(batch_size, num_windows * window_area, dim)`, key and value `(batch_size, num_tokens, dim)`, bias
    `(num_windows, num_heads, window_area, num_keys)`, key_index `(num_windows, num_keys)` -> the output `(batch_size,
    num_windows * window_area, dim)` and its log-sum-exp `(batch_size, num_windows, num_heads, window_area)`
    (float32), as `focal_hf.modeling_focal.cpu_gathered_attention`."""
    query, key, value, bias = (tensor.contiguous() for tensor in (query, key, value, bias))
    num_windows, _, sizes, blocks = _launch_arguments(query, key, bias, key_index, num_heads)
    output = torch.empty_like(query)
    logsumexp = query.new_empty(len(query), num_windows, num_heads, bias.shape[2], dtype=torch.float32)
    wrap_triton(_gathered_attention_forward)[(num_windows * num_heads, len(query))](
        query, key, value, bias, key_index, output, logsumexp, *sizes, scaling, **blocks
    )
    return output, logsumexp


@triton_op("focal_transformer::triton_gathered_attention_backward", mutates_args=())
def triton_gathered_attention_backward(
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
    """Gradients of `query`, `key`, `value` and `bias`; the attention matrix recomputed from `logsumexp`."""
    grad_output = grad_output.contiguous()
    num_windows, num_key_blocks, sizes, blocks = _launch_arguments(
        query, key, bias, key_index, num_heads, BACKWARD_KEY_BLOCK
    )
    batch_size = len(query)
    programs = num_windows * num_heads * num_key_blocks
    if query.is_cuda:
        target = PROGRAMS_PER_SM * torch.cuda.get_device_properties(query.device).multi_processor_count
        images_per_program = max(1, -(-batch_size * programs // target))
    else:
        images_per_program = 2  # (Triton's interpreter: groups of more than one image, as on a GPU)
    grad_query = torch.zeros_like(query, dtype=torch.float32)
    grad_key, grad_value = (torch.zeros_like(key, dtype=torch.float32) for _ in range(2))
    grad_bias = torch.zeros_like(bias, dtype=torch.float32)
    wrap_triton(_gathered_attention_backward)[(programs, -(-batch_size // images_per_program))](
        grad_output,
        query,
        key,
        value,
        bias,
        key_index,
        output,
        logsumexp,
        grad_query,
        grad_key,
        grad_value,
        grad_bias,
        *sizes,
        scaling,
        batch_size,
        images_per_program,
        **blocks,
    )
    grads = (grad_query, grad_key, grad_value, grad_bias)
    return tuple(grad.to(tensor.dtype) for grad, tensor in zip(grads, (query, key, value, bias), strict=True))


def _setup_context(ctx, inputs, output):
    query, key, value, bias, key_index, ctx.num_heads, ctx.scaling = inputs
    query, key, value, bias = (tensor.contiguous() for tensor in (query, key, value, bias))
    ctx.save_for_backward(query, key, value, bias, key_index, *output)


def _differentiate(ctx, grad_output, grad_logsumexp):
    grads = triton_gathered_attention_backward(grad_output, *ctx.saved_tensors, ctx.num_heads, ctx.scaling)
    return *grads, None, None, None


triton_gathered_attention.register_autograd(_differentiate, setup_context=_setup_context)


def focal_triton_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_index: torch.Tensor,
    attention_mask: torch.Tensor,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """`attn_implementation="focal_triton"`: `focal_sdpa_attention`'s inputs and output, computed by
    `triton_gathered_attention` where it applies (see the module's docstring), else by `focal_sdpa_attention`."""
    runs_here = query.is_cuda or query.is_meta or INTERPRETED
    if runs_here and dropout == 0.0 and fits(attention_mask) and not torch.compiler.is_exporting():
        num_heads = attention_mask.shape[1]
        return triton_gathered_attention(query, key, value, attention_mask, key_index, num_heads, scaling)[0], None
    return focal_sdpa_attention(module, query, key, value, key_index, attention_mask, scaling, dropout, **kwargs)


focal_triton_attention.gathers_keys = True
AttentionInterface.register("focal_triton", focal_triton_attention)
