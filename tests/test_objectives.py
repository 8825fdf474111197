"""Multi-task objectives, checked against cases worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from peft_palora.objectives import (
    LossBalancer,
    MultiTaskObjective,
    gradient_balance_scales,
    linear_scalarization,
    preference_consistency_penalty,
)


def test_linear_scalarization_single_preference():
    value = linear_scalarization(torch.tensor([1.0, 2.0]), torch.tensor([0.3, 0.7]))
    assert value.item() == pytest.approx(0.3 * 1.0 + 0.7 * 2.0)


def test_linear_scalarization_averages_over_the_window():
    losses = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    preferences = torch.tensor([[0.25, 0.75], [0.5, 0.5]])
    # row 0: 0.25 + 1.5 = 1.75; row 1: 1.5 + 2 = 3.5; mean 2.625
    assert linear_scalarization(losses, preferences).item() == pytest.approx(2.625)


def test_linear_scalarization_gradient_is_preference_over_window():
    losses = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    preferences = torch.tensor([[0.25, 0.75], [0.5, 0.5]])
    linear_scalarization(losses, preferences).backward()
    torch.testing.assert_close(losses.grad, preferences / 2)


@pytest.mark.parametrize(
    "losses, preferences, message",
    [
        (torch.ones(2, 3), torch.ones(2, 2) / 2, "same"),
        (torch.ones(2, 2, 2), torch.ones(2, 2) / 2, "task_losses"),
        (torch.ones(0, 2), torch.ones(0, 2), "empty"),
    ],
)
def test_linear_scalarization_rejects_bad_shapes(losses, preferences, message):
    with pytest.raises(ValueError, match=message):
        linear_scalarization(losses, preferences)


WINDOW = torch.tensor([[0.8, 0.2], [0.5, 0.5], [0.2, 0.8]])


def test_consistency_penalty_hand_computed():
    # task 0, rows by weight 0.8 > 0.5 > 0.2: losses 1.0, 0.5, 2.0 -> violations relu(0.5), relu(-1.5) = 0.5, 0
    # task 1, rows by weight 0.8 > 0.5 > 0.2 (rows 2, 1, 0): losses 2.0, 1.0, 3.0 -> violations 1.0, 0
    losses = torch.tensor([[1.0, 3.0], [0.5, 1.0], [2.0, 2.0]])
    temperature = 2.0
    expected = math.log((math.exp(2.0 * 0.5) + 1) / 2) + math.log((math.exp(2.0 * 1.0) + 1) / 2)
    value = preference_consistency_penalty(losses, WINDOW, temperature=temperature)
    assert value.item() == pytest.approx(expected, rel=1e-6)


def test_consistency_penalty_is_zero_for_an_ordered_window():
    # the more weight on a task, the lower its loss: no violation
    losses = torch.tensor([[0.1, 3.0], [0.5, 1.0], [2.0, 0.2]])
    assert preference_consistency_penalty(losses, WINDOW).item() == 0.0


def test_consistency_penalty_ignores_ties_and_single_rows():
    tied = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    assert preference_consistency_penalty(torch.tensor([[9.0, 0.0], [0.0, 9.0]]), tied).item() == 0.0
    assert preference_consistency_penalty(torch.tensor([[9.0, 0.0]]), torch.tensor([[0.9, 0.1]])).item() == 0.0


def test_consistency_penalty_gradient_pushes_the_violating_loss_down():
    # same window as the hand-computed value above, temperature 2
    losses = torch.tensor([[1.0, 3.0], [0.5, 1.0], [2.0, 2.0]], requires_grad=True)
    preference_consistency_penalty(losses, WINDOW, temperature=2.0).backward()
    # task 0: only the pair (row 0, row 1) violates, by v = L00 - L10; d/dv log((e^(2v) + 1) / 2) = 2e / (e + 1)
    # task 1: only the pair (row 2, row 1) violates, by v = L21 - L11; at v = 1 the derivative is 2e^2 / (e^2 + 1)
    d0 = 2 * math.e / (math.e + 1)
    d1 = 2 * math.e**2 / (math.e**2 + 1)
    expected = torch.tensor([[d0, 0.0], [-d0, -d1], [0.0, d1]])
    torch.testing.assert_close(losses.grad, expected)


def test_consistency_penalty_single_pair_is_the_violation():
    # with two rows there is one pair per task, and log(mean(exp(v))) = v
    losses = torch.tensor([[1.0, 0.1], [0.5, 2.0]])
    preferences = torch.tensor([[0.9, 0.1], [0.1, 0.9]])
    assert preference_consistency_penalty(losses, preferences).item() == pytest.approx(0.5 + 1.9)


def test_consistency_penalty_rejects_bad_temperature():
    with pytest.raises(ValueError, match="temperature"):
        preference_consistency_penalty(torch.ones(2, 2), WINDOW[:2], temperature=0.0)


def test_gradient_balance_scales_hand_computed():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    unused = torch.nn.Parameter(torch.tensor([5.0]))
    # window mean of task 0: (3 w0 + w0) / 2 = 2 w0 -> gradient (2, 0), norm 2
    # window mean of task 1: (w0 w1 + 2 w0 w1) / 2 = 1.5 w0 w1 -> gradient (1.5 w1, 1.5 w0) = (3, 1.5)
    losses = torch.stack([torch.stack([3 * w[0], w[0] * w[1]]), torch.stack([w[0], 2 * w[0] * w[1]])])
    scales = gradient_balance_scales(losses, [w, unused], eps=1e-3)
    expected = torch.tensor([1 / (2 + 1e-3), 1 / (math.sqrt(9 + 2.25) + 1e-3)])
    torch.testing.assert_close(scales, expected)
    assert not scales.requires_grad
    assert w.grad is None  # measuring the norms must not touch .grad


def test_gradient_balance_scales_needs_a_trainable_parameter():
    frozen = torch.nn.Parameter(torch.ones(1), requires_grad=False)
    with pytest.raises(ValueError, match="shared_parameters"):
        gradient_balance_scales(torch.ones(1, 2), [frozen])


def test_loss_balancer_running_average():
    balancer = LossBalancer(num_tasks=2, decay=0.5)
    # the first observation initialises the average: window mean of [[1, 4], [3, 4]] is [2, 4]
    torch.testing.assert_close(balancer.scales(torch.tensor([[1.0, 4.0], [3.0, 4.0]])), torch.tensor([0.5, 0.25]))
    # then 0.5 * [2, 4] + 0.5 * [4, 8] = [3, 6]
    torch.testing.assert_close(balancer.scales(torch.tensor([4.0, 8.0])), torch.tensor([1 / 3, 1 / 6]))
    assert balancer.num_updates == 2


def test_loss_balancer_reduce_fn_sees_the_window_mean():
    seen = []

    def reduce_fn(observation):
        seen.append(observation.clone())
        return observation * 2

    balancer = LossBalancer(num_tasks=2)
    scales = balancer.scales(torch.tensor([[1.0, 2.0], [3.0, 2.0]]), reduce_fn=reduce_fn)
    torch.testing.assert_close(seen[0], torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(scales, torch.tensor([0.25, 0.25]))


def test_loss_balancer_state_round_trip_continues_identically():
    first = LossBalancer(num_tasks=2, decay=0.7)
    first.scales(torch.tensor([1.0, 2.0]))
    first.scales(torch.tensor([3.0, 0.5]))
    second = LossBalancer(num_tasks=2, decay=0.7)
    second.load_state_dict(first.state_dict())
    torch.testing.assert_close(first.scales(torch.tensor([2.0, 2.0])), second.scales(torch.tensor([2.0, 2.0])))


def test_loss_balancer_validates_arguments():
    with pytest.raises(ValueError, match="decay"):
        LossBalancer(num_tasks=2, decay=1.0)
    with pytest.raises(ValueError, match="num_tasks"):
        LossBalancer(num_tasks=0)
    with pytest.raises(ValueError, match="running_mean"):
        LossBalancer(num_tasks=2).load_state_dict({"running_mean": torch.ones(3), "num_updates": 1})


def test_objective_plain_is_linear_scalarization():
    losses = torch.tensor([[1.0, 2.0], [3.0, 6.0]], requires_grad=True)
    preferences = torch.tensor([[0.5, 0.5], [0.25, 0.75]])
    output = MultiTaskObjective(num_tasks=2)(losses, preferences)
    assert output.loss.item() == pytest.approx((1.5 + (0.75 + 4.5)) / 2)
    assert output.consistency.item() == 0.0
    torch.testing.assert_close(output.task_scales, torch.ones(2))


def test_objective_loss_balancing_hand_computed():
    losses = torch.tensor([[1.0, 2.0], [3.0, 6.0]], requires_grad=True)
    preferences = torch.tensor([[0.5, 0.5], [0.25, 0.75]])
    objective = MultiTaskObjective(num_tasks=2, balancing="loss")
    output = objective(losses, preferences)
    # window means [2, 4]: balanced losses [[0.5, 0.5], [1.5, 1.5]] -> rows 0.5 and 1.5 -> mean 1.0
    assert output.loss.item() == pytest.approx(1.0)
    output.loss.backward()
    torch.testing.assert_close(losses.grad, preferences * torch.tensor([0.5, 0.25]) / 2)
    restored = MultiTaskObjective(num_tasks=2, balancing="loss")
    restored.load_state_dict(objective.state_dict())
    torch.testing.assert_close(restored.loss_balancer.running_mean, torch.tensor([2.0, 4.0], dtype=torch.float64))


def test_objective_gradient_balancing_matches_hand_computed_norms():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    losses = torch.stack([3 * w[0], w[0] * w[1]]).unsqueeze(0)  # gradient norms 3 and sqrt(5)
    preferences = torch.tensor([[0.4, 0.6]])
    output = MultiTaskObjective(num_tasks=2, balancing="gradient", gradient_balance_eps=1e-3)(
        losses, preferences, shared_parameters=[w]
    )
    expected = 0.4 * 3 / (3 + 1e-3) + 0.6 * 2 / (math.sqrt(5) + 1e-3)
    assert output.loss.item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="shared_parameters"):
        MultiTaskObjective(num_tasks=2, balancing="gradient")(losses, preferences)


def test_objective_adds_weighted_consistency_penalty():
    losses = torch.tensor([[1.0, 3.0], [0.5, 1.0], [2.0, 2.0]])
    output = MultiTaskObjective(num_tasks=2, consistency_weight=0.1, consistency_temperature=2.0)(losses, WINDOW)
    penalty = math.log((math.exp(1.0) + 1) / 2) + math.log((math.exp(2.0) + 1) / 2)
    assert output.consistency.item() == pytest.approx(penalty, rel=1e-6)
    assert output.loss.item() == pytest.approx(linear_scalarization(losses, WINDOW).item() + 0.1 * penalty, rel=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_tasks": 1}, "num_tasks"),
        ({"num_tasks": 2, "balancing": "magic"}, "balancing"),
        ({"num_tasks": 2, "consistency_weight": -1.0}, "consistency_weight"),
        ({"num_tasks": 2, "consistency_temperature": 0.0}, "consistency_temperature"),
    ],
)
def test_objective_validates_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MultiTaskObjective(**kwargs)


def test_objective_rejects_wrong_number_of_tasks():
    with pytest.raises(ValueError, match="tasks"):
        MultiTaskObjective(num_tasks=3)(torch.ones(1, 2), torch.tensor([[0.5, 0.5]]))
