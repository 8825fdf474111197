"""A convolution with a kernel built from parameters, ``conv(x, make_kernel(W, A, B, ...))``, that does not keep the
built kernel for the backward pass.

PaLoRA's convolution layers run one convolution with ``W + delta(lambda)`` when the whole batch shares a preference.
Plain autograd would keep that summed kernel alive until backward, one extra copy of every adapted weight: on SegNet
that is ~95 MiB, ten times the adapters' own state. The kernel is cheap to rebuild (a small batched matmul), so this
function keeps only its inputs and rebuilds it in backward, where ``aten.convolution_backward`` (the op autograd itself
uses for convolutions) gives the input and kernel gradients without re-running the convolution.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class _ConvWithRebuiltKernel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, conv_args, make_kernel, *kernel_inputs):
        # conv_args: aten.convolution's (stride, padding, dilation, transposed, output_padding, groups)
        with torch.no_grad():
            out = torch.ops.aten.convolution(x, make_kernel(*kernel_inputs), bias, *conv_args)
        ctx.save_for_backward(x, bias, *kernel_inputs)
        ctx.conv_args, ctx.make_kernel = conv_args, make_kernel
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, bias, *kernel_inputs = ctx.saved_tensors
        if torch.is_grad_enabled():  # `create_graph=True`: the gradients must themselves be differentiable
            return _differentiable_backward(ctx, grad_out, x, bias, kernel_inputs)
        need_x, need_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_inputs = ctx.needs_input_grad[4:]
        leaves = [t.detach().requires_grad_(need) for t, need in zip(kernel_inputs, need_inputs)]
        with torch.enable_grad():
            kernel = ctx.make_kernel(*leaves)
        need_kernel = any(need_inputs)
        grad_x, grad_kernel, grad_bias = torch.ops.aten.convolution_backward(
            grad_out,
            x,
            kernel.detach(),
            None if bias is None else list(bias.shape),
            *ctx.conv_args,
            [need_x, need_kernel, need_bias and bias is not None],
        )
        grads: list[torch.Tensor | None] = [None] * len(leaves)
        if need_kernel:
            wanted = [i for i, leaf in enumerate(leaves) if leaf.requires_grad]
            for i, grad in zip(wanted, torch.autograd.grad(kernel, [leaves[i] for i in wanted], grad_kernel)):
                grads[i] = grad
        return (grad_x if need_x else None, grad_bias if need_bias else None, None, None, *grads)


def _differentiable_backward(ctx, grad_out, x, bias, kernel_inputs):
    """The rare higher-order case (gradient penalties, meta-learning): differentiate the plain expression again."""
    inputs = [x, bias, None, None, *kernel_inputs]
    wanted = [i for i, need in enumerate(ctx.needs_input_grad) if need and inputs[i] is not None]
    with torch.enable_grad():
        kernel = ctx.make_kernel(*kernel_inputs)
        out = torch.ops.aten.convolution(x, kernel, bias, *ctx.conv_args)
        grads = torch.autograd.grad(out, [inputs[i] for i in wanted], grad_out, create_graph=True, allow_unused=True)
    result: list[torch.Tensor | None] = [None] * len(inputs)
    for i, grad in zip(wanted, grads):
        result[i] = grad
    return tuple(result)


def conv_with_rebuilt_kernel(
    conv: nn.modules.conv._ConvNd,
    x: torch.Tensor,
    make_kernel: Callable[..., torch.Tensor],
    kernel_inputs: Sequence[torch.Tensor],
) -> torch.Tensor:
    """``conv``'s forward on ``x`` with the kernel ``make_kernel(*kernel_inputs)`` instead of ``conv.weight``.

    Same result and gradients (for ``x``, ``conv.bias`` and every kernel input) as
    ``conv._conv_forward(x, make_kernel(*kernel_inputs), conv.bias)``, honouring the layer's stride, padding (numbers,
    ``"same"``/``"valid"`` and non-zero padding modes), dilation and groups; the built kernel is freed after the
    forward. Twice differentiable too (``create_graph=True`` re-runs the convolution in that backward).
    """
    padding = conv.padding
    if conv.padding_mode != "zeros" or padding == "same":
        # Pad explicitly, as nn.Conv does for padding modes; "same" then becomes padding 0 on the padded input.
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
        padding = (0,) * len(conv.stride)
    elif padding == "valid":
        padding = (0,) * len(conv.stride)
    conv_args = (list(conv.stride), list(padding), list(conv.dilation), False, [0] * len(conv.stride), conv.groups)
    return _ConvWithRebuiltKernel.apply(x, conv.bias, conv_args, make_kernel, *kernel_inputs)
