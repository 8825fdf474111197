"""Optimizer parameter groups for PaLoRA training."""

from __future__ import annotations

from typing import Any

from torch import nn

from peft_palora.tuner.layer import PaLoRALayer
from peft_palora.utils.checks import check_positive, check_real


def adapter_param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    adapter_lr_multiplier: float | None = None,
) -> list[dict[str, Any]]:
    """Split the trainable parameters into the groups the paper trains with.

    The paper gives the task adapters a learning rate T times the base one: each adapter only receives the gradient
    of its task weighted by lambda_t, which averages 1/T over the preference schedule, so scaling by T restores the
    step size the shared weights get.

    Args:
        model: a PEFT model with PaLoRA adapters (or any module containing PaLoRA layers).
        lr: learning rate of the non-adapter trainable parameters (base weights, heads, ...).
        weight_decay: applied to both groups.
        adapter_lr_multiplier: defaults to the number of tasks T of the active adapter(s).

    Returns:
        A list of param-group dicts for `torch.optim` (empty groups left out).
    """
    if check_real(lr, "`lr`") <= 0:
        raise ValueError(f"`lr` must be positive, got {lr}.")
    check_real(weight_decay, "`weight_decay`", minimum=0)
    if adapter_lr_multiplier is not None:
        check_positive(adapter_lr_multiplier, "`adapter_lr_multiplier`")
    adapter_params, other_params, num_tasks = [], [], set()
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, PaLoRALayer):
            for name in module.active_adapters:
                if name in module.palora_A:
                    num_tasks.add(module.num_tasks[name])
                    for param in (module.palora_A[name], module.palora_B[name]):
                        if param.requires_grad and id(param) not in seen:
                            adapter_params.append(param)
                            seen.add(id(param))
    for param in model.parameters():
        if param.requires_grad and id(param) not in seen:
            other_params.append(param)
            seen.add(id(param))
    if adapter_lr_multiplier is None:
        if len(num_tasks) > 1:
            raise ValueError(f"Active adapters have different task counts {sorted(num_tasks)}; pass adapter_lr_multiplier.")
        adapter_lr_multiplier = float(num_tasks.pop()) if num_tasks else 1.0
    groups = [
        {"params": adapter_params, "lr": lr * adapter_lr_multiplier, "weight_decay": weight_decay, "name": "palora_adapters"},
        {"params": other_params, "lr": lr, "weight_decay": weight_decay, "name": "shared"},
    ]
    return [group for group in groups if group["params"]]
