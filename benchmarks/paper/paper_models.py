"""The networks of the PaLoRA paper's experiments, written for these benchmarks, and the PaMaL baseline.

* :class:`MultiLeNet`: the MultiMNIST network of Sener & Koltun (2018) as used by Pareto Manifold Learning (PaMaL) and
  PaLoRA: a LeNet encoder (two 5x5 convolutions with max-pooling, then a 320 -> 50 linear layer) shared by the tasks,
  and one head per task (50 -> 50 -> 10). The paper's code adapts *every* convolution and linear layer of this
  network, heads included (:data:`MULTILENET_TARGETS`).
* :class:`SegNet`: the SegNet encoder-decoder used for CityScapes (2 tasks) and NYUv2 (3 tasks) in the MTL literature
  (Liu et al., 2019; Navon et al., 2022), with one two-convolution prediction head per task. PaLoRA adapts every
  convolution of it (:func:`conv_and_linear_names`); batch norm is not adapted.
* :class:`PaMaL`: Pareto Manifold Learning (Dimitriadis et al., 2023) as a wrapper: it keeps T independently
  initialised copies of *every* parameter of a network (convolutions, linear layers and batch norm alike) and runs the
  network with the convex combination ``sum_t lambda_t * theta_t`` for a preference ``lambda``. It is the
  full-weight counterpart of PaLoRA, which keeps one copy plus T low-rank adapters.

Every model returns a dict ``{task_name: output}``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

MULTIMNIST_TASKS = ("left", "right")
#: The layers the paper's code adapts in MultiLeNet: every Conv2d and Linear, the task heads included.
MULTILENET_TARGETS = ["conv1", "conv2", "fc", "fc1", "fc2"]
SEGNET_FILTERS = (64, 128, 256, 512, 512)
#: Output channels of the prediction heads: CityScapes (7-class segmentation, depth) and NYUv2 (13-class
#: segmentation, depth, surface normals).
SEGNET_TASKS = {
    "cityscapes": {"segmentation": 7, "depth": 1},
    "nyuv2": {"segmentation": 13, "depth": 1, "normal": 3},
}


# ---------------------------------------------------------------------------------------------------------------------
# MultiLeNet
# ---------------------------------------------------------------------------------------------------------------------
class MultiLeNetEncoder(nn.Module):
    """Two 5x5 convolutions (10 and 20 channels) with 2x2 max-pooling, then a 320 -> 50 linear layer."""

    def __init__(self, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.fc = nn.Linear(320, 50)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2(x), 2))
        return F.relu(self.fc(x.flatten(1)))


class MultiLeNetHead(nn.Module):
    """50 -> 50 -> 10 with a ReLU in between; returns logits (cross-entropy is applied by the loss)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(50, 50)
        self.fc2 = nn.Linear(50, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class MultiLeNet(nn.Module):
    """Shared MultiLeNet encoder with one head per task: ``model(x) -> {task: logits}``."""

    def __init__(self, task_names: Sequence[str] = MULTIMNIST_TASKS) -> None:
        super().__init__()
        self.encoder = MultiLeNetEncoder()
        self.heads = nn.ModuleDict({task: MultiLeNetHead() for task in task_names})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.encoder(x)
        return {task: head(features) for task, head in self.heads.items()}


# ---------------------------------------------------------------------------------------------------------------------
# SegNet
# ---------------------------------------------------------------------------------------------------------------------
def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SegNet(nn.Module):
    """SegNet: five encoder stages (VGG-like, max-pooling with indices) and five mirrored decoder stages.

    Stage ``i`` of the encoder is one 3x3 conv-BN-ReLU block from ``filters[i-1]`` to ``filters[i]`` followed by one
    block (stages 0-1) or two blocks (stages 2-4) at ``filters[i]``; the decoder mirrors it with max-unpooling. Each
    task reads the 64-channel decoder output through its own 3x3 convolution and 1x1 classifier. About 25M parameters.
    Weights are Xavier-normal with zero biases, as in the MTL code this architecture comes from.

    Args:
        tasks: ``{task_name: output_channels}``, e.g. ``SEGNET_TASKS["cityscapes"]``.
    """

    def __init__(self, tasks: dict[str, int], filters: Sequence[int] = SEGNET_FILTERS, in_channels: int = 3) -> None:
        super().__init__()
        f = list(filters)
        self.encoder_block = nn.ModuleList([_conv_bn_relu(in_channels, f[0])])
        self.decoder_block = nn.ModuleList([_conv_bn_relu(f[0], f[0])])
        for i in range(4):
            self.encoder_block.append(_conv_bn_relu(f[i], f[i + 1]))
            self.decoder_block.append(_conv_bn_relu(f[i + 1], f[i]))
        self.conv_block_enc = nn.ModuleList([_conv_bn_relu(f[0], f[0]), _conv_bn_relu(f[1], f[1])])
        self.conv_block_dec = nn.ModuleList([_conv_bn_relu(f[0], f[0]), _conv_bn_relu(f[0], f[0])])
        for i in range(1, 4):
            self.conv_block_enc.append(
                nn.Sequential(_conv_bn_relu(f[i + 1], f[i + 1]), _conv_bn_relu(f[i + 1], f[i + 1]))
            )
            self.conv_block_dec.append(nn.Sequential(_conv_bn_relu(f[i], f[i]), _conv_bn_relu(f[i], f[i])))
        self.heads = nn.ModuleDict(
            {
                task: nn.Sequential(
                    nn.Conv2d(f[0], f[0], kernel_size=3, padding=1), nn.Conv2d(f[0], channels, kernel_size=1)
                )
                for task, channels in tasks.items()
            }
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_normal_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        indices = []
        for encoder, conv in zip(self.encoder_block, self.conv_block_enc):
            x, index = F.max_pool2d(conv(encoder(x)), kernel_size=2, stride=2, return_indices=True)
            indices.append(index)
        for i in reversed(range(5)):
            x = F.max_unpool2d(x, indices[i], kernel_size=2, stride=2)
            x = self.conv_block_dec[i](self.decoder_block[i](x))
        return {task: head(x) for task, head in self.heads.items()}


# ---------------------------------------------------------------------------------------------------------------------
# PaMaL
# ---------------------------------------------------------------------------------------------------------------------
class PaMaL(nn.Module):
    """Pareto Manifold Learning: T full copies of a network's parameters, mixed convexly by the preference.

    ``model(x, preference=lam)`` runs ``network`` with every parameter replaced by ``sum_t lam_t * theta_t``. The
    copies are initialised independently (the paper re-initialises every ensemble member); buffers such as batch-norm
    running statistics are shared. Only a single ``(T,)`` preference per call is supported: a per-sample mixture of
    full weight matrices would need one weight copy per sample.

    Args:
        network: the template; it is deep-copied T times and each copy re-initialised with ``reset_parameters``.
        num_tasks: T.
        init: optional ``fn(module)`` applied to each copy after ``reset_parameters`` (e.g. SegNet's Xavier init).
    """

    def __init__(self, network: nn.Module, num_tasks: int, init=None) -> None:
        super().__init__()
        if num_tasks < 2:
            raise ValueError(f"`num_tasks` must be >= 2, got {num_tasks}.")
        self.num_tasks = num_tasks
        self.network = network
        self._names = [name for name, _ in network.named_parameters()]
        members = []
        for _ in range(num_tasks):
            member = copy.deepcopy(network)
            for module in member.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
            if init is not None:
                init(member)
            members.append(nn.ParameterList([param for _, param in member.named_parameters()]))
        self.members = nn.ModuleList(members)
        # The template's own parameters are never used (every call substitutes the mixture): empty them so that they
        # take no memory and do not count as parameters. Its buffers (batch-norm statistics) stay in use.
        for param in network.parameters():
            param.requires_grad_(False)
            param.data = param.data.new_empty(0)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [param for member in self.members for param in member]

    def mixed_parameters(self, preference: torch.Tensor) -> dict[str, torch.Tensor]:
        if preference.shape != (self.num_tasks,):
            raise ValueError(f"`preference` must have shape ({self.num_tasks},), got {tuple(preference.shape)}.")
        mixed = {}
        for index, name in enumerate(self._names):
            stacked = torch.stack([member[index] for member in self.members])
            weights = preference.to(stacked.dtype).view(-1, *([1] * (stacked.dim() - 1)))
            mixed[name] = (weights * stacked).sum(0)
        return mixed

    def forward(self, x: torch.Tensor, preference: torch.Tensor) -> dict[str, torch.Tensor]:
        return functional_call(self.network, self.mixed_parameters(preference), (x,))


def xavier_init(module: nn.Module) -> None:
    """SegNet's initialisation, for PaMaL's re-initialised copies."""
    for sub in module.modules():
        if isinstance(sub, nn.Conv2d):
            nn.init.xavier_normal_(sub.weight)
            nn.init.zeros_(sub.bias)


def conv_and_linear_names(model: nn.Module) -> list[str]:
    """Full names of every Conv2d and Linear layer: the paper's code adapts all of them (for SegNet, every conv)."""
    return [name for name, module in model.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear))]


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def paper_conv_adapter_parameters(model: nn.Module, num_tasks: int, rank: int) -> int:
    """Adapter parameters in the layout of the paper's code (loralib-style convolution adapters).

    There a k x k convolution adapter is ``B (out * k, r * k) @ A (r * k, in * k)`` reshaped to the kernel: ``r * k *
    (in * k + out * k)`` parameters per task; a linear adapter is ``r * (in + out)``. This library's convolution
    adapter is instead a k x k convolution to r channels followed by a 1x1 convolution: ``r * (in * k * k + out)``
    per task.
    """
    total = 0
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0]
            total += num_tasks * rank * k * (module.in_channels * k + module.out_channels * k)
        elif isinstance(module, nn.Linear):
            total += num_tasks * rank * (module.in_features + module.out_features)
    return total
