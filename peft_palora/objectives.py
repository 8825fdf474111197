"""Multi-task objectives for training PaLoRA along a window of preferences.

PaLoRA trains one model for a whole front of trade-offs: at every step a window of ``m`` preferences
``lambda_1 .. lambda_m`` (each a point of the simplex over ``T`` tasks) is drawn, the model runs once per
preference, and the task losses form a matrix ``L`` of shape ``(m, T)``. This module turns that matrix into the
scalar that is back-propagated:

* :func:`linear_scalarization` -- the paper's objective ``mean_i sum_t lambda_it * L_it``.
* :class:`LossBalancer` -- divides each task loss by a running average of itself, so that tasks whose losses
  live on different scales (cross-entropy next to a regression loss, say) are weighed by the preference and not by
  their units.
* :func:`gradient_balance_scales` -- divides each task loss by the norm of its gradient on the shared
  parameters, so that the preference, not the size of the gradients, decides which task moves the backbone.
* :func:`preference_consistency_penalty` -- the multi-forward regulariser of Pareto Manifold Learning: inside a
  window, the member that weighs task ``t`` more should have the lower loss on ``t``; pairs that break this order
  are penalised. Off by default.
* :class:`MultiTaskObjective` -- puts the pieces together, keeps the balancer's state and can save it (as plain
  tensors and numbers, no pickle) so that a resumed run continues exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from peft_palora.utils.checks import check_int, check_positive, check_real

BALANCING_CHOICES = ("none", "loss", "gradient")
BalancingMode = Literal["none", "loss", "gradient"]


def _check_window(task_losses: torch.Tensor, preferences: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring ``task_losses`` and ``preferences`` to a common ``(m, T)`` shape, or raise naming the problem."""
    if not isinstance(task_losses, torch.Tensor):
        raise TypeError(f"`task_losses` must be a torch.Tensor, got {type(task_losses).__name__}.")
    if not isinstance(preferences, torch.Tensor):
        preferences = torch.as_tensor(preferences)
    if task_losses.dim() == 1:
        task_losses = task_losses.unsqueeze(0)
    if preferences.dim() == 1:
        preferences = preferences.unsqueeze(0)
    if task_losses.dim() != 2:
        raise ValueError(f"`task_losses` must have shape (T,) or (m, T), got {tuple(task_losses.shape)}.")
    if preferences.dim() != 2:
        raise ValueError(f"`preferences` must have shape (T,) or (m, T), got {tuple(preferences.shape)}.")
    if task_losses.shape != preferences.shape:
        raise ValueError(
            f"`task_losses` {tuple(task_losses.shape)} and `preferences` {tuple(preferences.shape)} must have the "
            "same (window, num_tasks) shape."
        )
    if task_losses.shape[0] == 0:
        raise ValueError("`task_losses` is empty: the window must hold at least one preference.")
    return task_losses, preferences.to(device=task_losses.device, dtype=task_losses.dtype)


def linear_scalarization(task_losses: torch.Tensor, preferences: torch.Tensor) -> torch.Tensor:
    """The linear scalarisation ``sum_t lambda_t * L_t``, averaged over a window of preferences.

    Args:
        task_losses: ``(T,)`` losses for one preference, or ``(m, T)``: row ``i`` holds the task losses obtained with
            the model at preference ``preferences[i]``.
        preferences: the matching ``(T,)`` or ``(m, T)`` preferences.

    Returns:
        A scalar: ``mean_i sum_t preferences[i, t] * task_losses[i, t]``. Averaging (not summing) over the window
        keeps the gradient's scale independent of the window size, so a learning rate tuned with one preference
        per step still fits ``m`` of them.
    """
    task_losses, preferences = _check_window(task_losses, preferences)
    return (preferences * task_losses).sum(dim=1).mean()


def preference_consistency_penalty(
    task_losses: torch.Tensor, preferences: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Penalise a window whose task losses are not ordered like its preferences (Pareto Manifold Learning).

    For each task ``t`` the window's rows are ranked by their weight ``lambda_t`` (largest first). A row that weighs
    ``t`` more than the next row should reach a loss on ``t`` no larger than that row's; the amount by which it is
    larger is a violation ``v = relu(L_t[heavier] - L_t[lighter])``. Neighbouring rows with equal weight on ``t``
    carry no order and are ignored. The violations of task ``t`` are combined by the smooth maximum
    ``log(mean(exp(temperature * v)))``, which is 0 when the window is consistent and grows with the worst violation;
    the penalty is the sum over tasks.

    Args:
        task_losses: ``(m, T)`` losses, row ``i`` obtained at ``preferences[i]``.
        preferences: ``(m, T)`` preferences.
        temperature: sharpness of the smooth maximum (> 0); large values approach ``temperature * max(v)``.

    Returns:
        A non-negative scalar, differentiable in ``task_losses``; exactly 0 for a window of fewer than two rows.
    """
    task_losses, preferences = _check_window(task_losses, preferences)
    check_positive(temperature, "`temperature`", finite=False)
    num_rows, num_tasks = task_losses.shape
    penalty = task_losses.new_zeros(())
    if num_rows < 2:
        return penalty
    for task in range(num_tasks):
        order = torch.argsort(preferences[:, task], descending=True, stable=True)
        weights = preferences[order, task]
        losses = task_losses[order, task]
        violation = torch.relu(losses[:-1] - losses[1:])
        ordered = weights[:-1] > weights[1:]
        violation = torch.where(ordered, violation, torch.zeros_like(violation))
        penalty = penalty + torch.log(torch.exp(temperature * violation).mean())
    return penalty


def gradient_balance_scales(
    task_losses: torch.Tensor, shared_parameters: Iterable[torch.nn.Parameter], eps: float = 1e-3
) -> torch.Tensor:
    """Per-task factors ``1 / (||grad_shared mean_i L_it|| + eps)`` (constants: no gradient flows through them).

    The gradient of each task's loss, averaged over the window, is taken with respect to the shared parameters (the
    backbone and its adapters, not the task heads); multiplying the task's losses by the returned factor makes every
    task pull on the shared weights with a gradient of (about) unit norm, so the preference alone sets the mix. This
    costs one extra backward pass per task.

    Args:
        task_losses: ``(m, T)`` or ``(T,)`` losses still attached to the graph.
        shared_parameters: the parameters on which the norms are measured; parameters a task does not reach count
            as zero gradient.
        eps: added to each norm so that a task whose gradient vanishes is not blown up.

    Returns:
        A detached ``(T,)`` tensor of factors.
    """
    if task_losses.dim() == 1:
        task_losses = task_losses.unsqueeze(0)
    check_positive(eps, "`eps`", finite=False)
    parameters = [parameter for parameter in shared_parameters if parameter.requires_grad]
    if not parameters:
        raise ValueError("`shared_parameters` holds no parameter that requires a gradient.")
    per_task_loss = task_losses.mean(dim=0)
    scales = []
    for task_loss in per_task_loss:
        gradients = torch.autograd.grad(task_loss, parameters, retain_graph=True, allow_unused=True)
        squared = sum(
            (gradient.detach().float().pow(2).sum() for gradient in gradients if gradient is not None),
            torch.zeros((), device=task_losses.device),
        )
        scales.append(1.0 / (squared.sqrt() + eps))
    return torch.stack(scales).to(task_losses.dtype)


class LossBalancer:
    """Keeps an exponential running average of each task's loss and divides the losses by it.

    The first observation initialises the average, so the first balanced losses are exactly 1; afterwards
    ``average <- decay * average + (1 - decay) * observation``, with the observation being each task's loss averaged
    over the window (and, when a ``reduce_fn`` is given, over processes, which keeps the averages identical on every
    rank of a data-parallel run). The averages are detached: balancing rescales the losses, it does not add a
    gradient of its own.
    """

    def __init__(self, num_tasks: int, decay: float = 0.9, eps: float = 1e-8):
        num_tasks = check_int(num_tasks, "`num_tasks`", minimum=1)
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"`decay` must be in [0, 1), got {decay}.")
        self.num_tasks = num_tasks
        self.decay = float(decay)
        self.eps = float(eps)
        self.running_mean = torch.zeros(num_tasks, dtype=torch.float64)
        self.num_updates = 0

    def update(self, observation: torch.Tensor) -> torch.Tensor:
        """Fold a ``(T,)`` observation into the averages and return the current ``(T,)`` averages."""
        observation = observation.detach().to("cpu", torch.float64).reshape(-1)
        if observation.numel() != self.num_tasks:
            raise ValueError(f"expected {self.num_tasks} task losses, got {observation.numel()}.")
        if self.num_updates == 0:
            self.running_mean = observation.clone()
        else:
            self.running_mean = self.decay * self.running_mean + (1.0 - self.decay) * observation
        self.num_updates += 1
        return self.running_mean.clone()

    def scales(
        self, task_losses: torch.Tensor, reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Update with ``task_losses`` (``(m, T)``) and return the detached ``(T,)`` factors ``1 / average``."""
        if task_losses.dim() == 1:
            task_losses = task_losses.unsqueeze(0)
        observation = task_losses.detach().mean(dim=0)
        if reduce_fn is not None:
            observation = reduce_fn(observation)
        average = self.update(observation)
        return (1.0 / average.clamp_min(self.eps)).to(device=task_losses.device, dtype=task_losses.dtype)

    def state_dict(self) -> dict:
        return {"running_mean": self.running_mean.clone(), "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        running_mean = torch.as_tensor(state["running_mean"], dtype=torch.float64).reshape(-1)
        if running_mean.numel() != self.num_tasks:
            raise ValueError(f"`running_mean` holds {running_mean.numel()} tasks, expected {self.num_tasks}.")
        self.running_mean = running_mean.clone()
        self.num_updates = int(state["num_updates"])


@dataclass
class ObjectiveOutput:
    """What :class:`MultiTaskObjective` computed for one window.

    Attributes:
        loss: the scalar to back-propagate.
        scalarized: the (balanced) linear scalarisation part of ``loss``.
        consistency: the consistency penalty before its weight (0 when disabled).
        task_losses: the raw ``(m, T)`` losses, detached (for logging).
        task_scales: the ``(T,)`` balancing factors applied (ones without balancing).
    """

    loss: torch.Tensor
    scalarized: torch.Tensor
    consistency: torch.Tensor
    task_losses: torch.Tensor
    task_scales: torch.Tensor


class MultiTaskObjective:
    """The scalar PaLoRA minimises for a window of preferences.

    ``loss = linear_scalarization(s * L, lambda) + consistency_weight * preference_consistency_penalty(s * L, lambda)``
    where ``s`` are the per-task balancing factors (ones for ``balancing="none"``, ``1 / running average`` for
    ``"loss"``, ``1 / gradient norm`` for ``"gradient"``).

    Args:
        num_tasks: number of tasks ``T``.
        balancing: ``"none"`` (the paper's default linear scalarisation), ``"loss"`` or ``"gradient"``.
        consistency_weight: weight of the multi-forward consistency regulariser; 0 (default) disables it. It needs a
            window of at least two preferences to have any effect.
        consistency_temperature: temperature of the regulariser's smooth maximum.
        loss_balance_decay: decay of the running averages used by ``balancing="loss"``.
        gradient_balance_eps: ``eps`` of :func:`gradient_balance_scales`.
    """

    def __init__(
        self,
        num_tasks: int,
        balancing: BalancingMode = "none",
        consistency_weight: float = 0.0,
        consistency_temperature: float = 1.0,
        loss_balance_decay: float = 0.9,
        gradient_balance_eps: float = 1e-3,
    ):
        num_tasks = check_int(num_tasks, "`num_tasks`", minimum=2)
        if balancing not in BALANCING_CHOICES:
            raise ValueError(f"`balancing` must be one of {BALANCING_CHOICES}, got {balancing!r}.")
        check_real(consistency_weight, "`consistency_weight`", minimum=0, finite=False)
        check_positive(consistency_temperature, "`consistency_temperature`", finite=False)
        check_positive(gradient_balance_eps, "`gradient_balance_eps`", finite=False)
        self.num_tasks = num_tasks
        self.balancing = balancing
        self.consistency_weight = float(consistency_weight)
        self.consistency_temperature = float(consistency_temperature)
        self.gradient_balance_eps = float(gradient_balance_eps)
        self.loss_balancer = LossBalancer(num_tasks, decay=loss_balance_decay)

    @property
    def needs_shared_parameters(self) -> bool:
        return self.balancing == "gradient"

    def __call__(
        self,
        task_losses: torch.Tensor,
        preferences: torch.Tensor,
        shared_parameters: Sequence[torch.nn.Parameter] | None = None,
        reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> ObjectiveOutput:
        """Compute the objective for ``(m, T)`` task losses obtained at ``(m, T)`` preferences.

        Args:
            shared_parameters: required for ``balancing="gradient"``.
            reduce_fn: applied to the window-mean task losses before they update the loss balancer's averages
                (for example a mean over processes); ignored otherwise.
        """
        task_losses, preferences = _check_window(task_losses, preferences)
        if task_losses.shape[1] != self.num_tasks:
            raise ValueError(f"`task_losses` has {task_losses.shape[1]} tasks, the objective {self.num_tasks}.")
        if self.balancing == "loss":
            scales = self.loss_balancer.scales(task_losses, reduce_fn=reduce_fn)
        elif self.balancing == "gradient":
            if shared_parameters is None:
                raise ValueError('`shared_parameters` is required with balancing="gradient".')
            scales = gradient_balance_scales(task_losses, shared_parameters, eps=self.gradient_balance_eps)
        else:
            scales = torch.ones(self.num_tasks, device=task_losses.device, dtype=task_losses.dtype)
        balanced = task_losses * scales.unsqueeze(0)
        scalarized = linear_scalarization(balanced, preferences)
        if self.consistency_weight > 0:
            consistency = preference_consistency_penalty(balanced, preferences, self.consistency_temperature)
            loss = scalarized + self.consistency_weight * consistency
        else:
            consistency = scalarized.new_zeros(())
            loss = scalarized
        return ObjectiveOutput(
            loss=loss,
            scalarized=scalarized.detach(),
            consistency=consistency.detach(),
            task_losses=task_losses.detach(),
            task_scales=scales.detach(),
        )

    def state_dict(self) -> dict:
        """The state a resumed run needs (only the loss balancer has any): tensors and numbers only."""
        return {"loss_balancer": self.loss_balancer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.loss_balancer.load_state_dict(state["loss_balancer"])
