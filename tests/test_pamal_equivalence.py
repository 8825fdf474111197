"""The benchmarks' PaMaL against a float64 reference written from the Pareto Manifold Learning equations.

PaMaL (Dimitriadis et al., 2023): every layer's weights are a convex combination of T ensemble members,
``W(lambda) = sum_t lambda_t W_t``; for a window of sampled preferences ``lambda_1 .. lambda_m`` the objective is the
mean over the window of ``sum_t lambda_{b,t} L_t(W(lambda_b))`` (plus an optional consistency penalty, coefficient 0
here: the benchmarks' PaMaL has none), and every member is updated by SGD/Adam.

The reference below is independent of ``paper_models.PaMaL``: the mixture is an explicit Python sum, MultiLeNet's
forward is written out with ``torch.nn.functional`` (no module), the update rules are written out by hand. It runs in
float64. The benchmarks' objective **sums** the window (``multimnist.py``: ``(prefs * losses).sum()``, as the
PaLoRA paper's multi-forward trainer does) where the PaMaL paper averages it: the gradients are exactly ``m`` times
the paper's. Under SGD that is the learning rate times ``m``; under Adam (which every benchmark uses) it changes
nothing but the effective epsilon (``eps / m``). The tests pin both facts.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "paper"))

import paper_models  # noqa: E402
import paper_training as pt  # noqa: E402

TASKS = paper_models.MULTIMNIST_TASKS
WINDOW = 3


# ---- the reference, from the equations ------------------------------------------------------------------------------
def ref_mix(members: list[dict[str, torch.Tensor]], pref: torch.Tensor) -> dict[str, torch.Tensor]:
    """W(lambda) = sum_t lambda_t W_t, layer by layer."""
    mixed = {}
    for name in members[0]:
        total = pref[0] * members[0][name]
        for t in range(1, len(members)):
            total = total + pref[t] * members[t][name]
        mixed[name] = total
    return mixed


def ref_forward(w: dict[str, torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
    """MultiLeNet written out: conv5x5(10) - pool - relu - conv5x5(20) - pool - relu - fc(50) - relu, then per task
    fc(50) - relu - fc(10)."""
    h = F.relu(F.max_pool2d(F.conv2d(x, w["encoder.conv1.weight"], w["encoder.conv1.bias"]), 2))
    h = F.relu(F.max_pool2d(F.conv2d(h, w["encoder.conv2.weight"], w["encoder.conv2.bias"]), 2))
    h = F.relu(h.reshape(h.shape[0], -1) @ w["encoder.fc.weight"].T + w["encoder.fc.bias"])
    logits = []
    for task in TASKS:
        z = F.relu(h @ w[f"heads.{task}.fc1.weight"].T + w[f"heads.{task}.fc1.bias"])
        logits.append(z @ w[f"heads.{task}.fc2.weight"].T + w[f"heads.{task}.fc2.bias"])
    return logits


def ref_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean of -log softmax(logits)[target], written out."""
    log_probs = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    return -log_probs[torch.arange(target.shape[0]), target].mean()


def ref_task_losses(members, pref, x, labels) -> torch.Tensor:
    logits = ref_forward(ref_mix(members, pref), x)
    return torch.stack([ref_cross_entropy(z, labels[:, t]) for t, z in enumerate(logits)])


def ref_objective(members, prefs, x, labels, penalty: float = 0.0) -> torch.Tensor:
    """The PaMaL paper's window objective: mean over the window of sum_t lambda_t L_t (penalty coefficient 0)."""
    if penalty:
        raise NotImplementedError("the consistency penalty is not part of the benchmarks' PaMaL")
    return torch.stack([(pref * ref_task_losses(members, pref, x, labels)).sum() for pref in prefs]).mean()


def ref_gradients(members, prefs, x, labels) -> list[dict[str, torch.Tensor]]:
    leaves = [{k: v.detach().clone().requires_grad_(True) for k, v in m.items()} for m in members]
    ref_objective(leaves, prefs, x, labels).backward()
    return [{k: v.grad for k, v in m.items()} for m in leaves]


# ---- helpers --------------------------------------------------------------------------------------------------------
def _setup(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    model = paper_models.PaMaL(paper_models.MultiLeNet(), num_tasks=len(TASKS)).to(dtype)
    names = model._names
    members = [{n: p.detach().to(torch.float64).clone() for n, p in zip(names, member)} for member in model.members]
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.rand(12, 1, 28, 28, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 10, (12, len(TASKS)), generator=g)
    prefs = torch.distributions.Dirichlet(torch.ones(len(TASKS), dtype=torch.float64)).sample((WINDOW,))
    return model, names, members, x, labels, prefs


def _package_objective(model, x, labels, prefs):
    """The benchmarks' PaMaL objective exactly as multimnist.py builds it (window summed)."""
    dtype = next(model.parameters()).dtype
    prefs = prefs.to(dtype)
    return (prefs * pt.pamal_window_losses(model, x.to(dtype), labels, prefs)).sum()


def _package_members(model, names):
    return [{n: p.detach().to(torch.float64) for n, p in zip(names, member)} for member in model.members]


def _assert_members_close(a, b, rtol, atol):
    for ma, mb in zip(a, b, strict=True):
        for name in ma:
            torch.testing.assert_close(ma[name], mb[name], rtol=rtol, atol=atol, msg=name)


# ---- tests ----------------------------------------------------------------------------------------------------------
def test_forward_and_task_losses_match_the_reference():
    model, _, members, x, labels, prefs = _setup()
    for pref in prefs:
        outputs = model(x, pref)
        reference = ref_forward(ref_mix(members, pref), x)
        for task, ref_logits in zip(TASKS, reference):
            torch.testing.assert_close(outputs[task], ref_logits, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(
            pt.task_losses(outputs, labels), ref_task_losses(members, pref, x, labels), rtol=1e-12, atol=1e-12
        )
    # the corners are the members themselves
    corner = ref_forward(members[1], x)
    torch.testing.assert_close(model(x, torch.tensor([0.0, 1.0], dtype=torch.float64))["right"], corner[1])


def test_float32_forward_agrees_with_the_float64_reference():
    model, _, members, x, labels, prefs = _setup(dtype=torch.float32)
    for pref in prefs:
        losses = pt.task_losses(model(x.float(), pref.float()), labels).double()
        torch.testing.assert_close(losses, ref_task_losses(members, pref, x, labels), rtol=1e-5, atol=1e-6)


def test_window_objective_is_the_papers_mean_times_the_window():
    model, _, members, x, labels, prefs = _setup()
    package = _package_objective(model, x, labels, prefs)
    paper = ref_objective(members, prefs, x, labels)
    torch.testing.assert_close(package, WINDOW * paper, rtol=1e-12, atol=1e-12)


def test_gradients_match_the_reference_and_the_chain_rule():
    model, names, members, x, labels, prefs = _setup()
    _package_objective(model, x, labels, prefs).backward()
    package = [{n: p.grad.detach() / WINDOW for n, p in zip(names, member)} for member in model.members]
    reference = ref_gradients(members, prefs, x, labels)
    _assert_members_close(package, reference, rtol=1e-10, atol=1e-12)
    # chain rule through W(lambda): dJ/dW_t = mean_b lambda_{b,t} * dJ_b/dW(lambda_b)
    by_mixture = []
    for pref in prefs:
        mixed = {k: v.detach().requires_grad_(True) for k, v in ref_mix(members, pref).items()}
        logits = ref_forward(mixed, x)
        (pref * torch.stack([ref_cross_entropy(z, labels[:, t]) for t, z in enumerate(logits)])).sum().backward()
        by_mixture.append({k: v.grad for k, v in mixed.items()})
    for t, member_grads in enumerate(reference):
        for name, grad in member_grads.items():
            expected = sum(prefs[b, t] * by_mixture[b][name] for b in range(WINDOW)) / WINDOW
            torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)


def test_sgd_steps_match_the_reference_at_lr_over_window():
    """Summing the window is SGD on the paper's mean objective with the learning rate times the window."""
    model, names, members, x, labels, prefs_seq = _setup()
    lr = 0.05
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=lr / WINDOW)
    g = torch.Generator().manual_seed(7)
    for _ in range(4):
        prefs = torch.distributions.Dirichlet(torch.ones(len(TASKS), dtype=torch.float64)).sample((WINDOW,))
        index = torch.randperm(x.shape[0], generator=g)[:8]
        xb, yb = x[index], labels[index]
        optimizer.zero_grad()
        _package_objective(model, xb, yb, prefs).backward()
        optimizer.step()
        grads = ref_gradients(members, prefs, xb, yb)
        members = [{k: m[k] - lr * gm[k] for k in m} for m, gm in zip(members, grads)]
    _assert_members_close(_package_members(model, names), members, rtol=1e-9, atol=1e-11)


def _ref_adam(members, grads, state, lr, eps, betas=(0.9, 0.999)):
    """Kingma & Ba (2015), Algorithm 1, written out."""
    state["step"] += 1
    step = state["step"]
    updated = []
    for t, (member, grad) in enumerate(zip(members, grads)):
        new = {}
        for k in member:
            m = state.setdefault(("m", t, k), torch.zeros_like(member[k]))
            v = state.setdefault(("v", t, k), torch.zeros_like(member[k]))
            m = betas[0] * m + (1 - betas[0]) * grad[k]
            v = betas[1] * v + (1 - betas[1]) * grad[k] ** 2
            state[("m", t, k)], state[("v", t, k)] = m, v
            m_hat, v_hat = m / (1 - betas[0] ** step), v / (1 - betas[1] ** step)
            new[k] = member[k] - lr * m_hat / (v_hat.sqrt() + eps)
        updated.append(new)
    return updated


def test_adam_steps_match_the_reference_with_epsilon_over_window():
    """Adam is invariant to the window's sum-vs-mean but for epsilon: the benchmarks' Adam(eps) on the summed window
    is the paper's mean objective under Adam(eps / m), step for step. (Against Adam(eps) on the mean, the two differ
    only where |gradient| is near eps: after 4 steps on this random batch up to 7e-4 on a few weights that barely
    get a gradient; an lr-sized step is 1e-3.)"""
    model, names, members, x, labels, _ = _setup()
    lr, eps = 1e-3, 1e-8
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=lr, eps=eps)
    state = {"step": 0}
    for _ in range(4):
        prefs = torch.distributions.Dirichlet(torch.ones(len(TASKS), dtype=torch.float64)).sample((WINDOW,))
        optimizer.zero_grad()
        _package_objective(model, x, labels, prefs).backward()
        optimizer.step()
        members = _ref_adam(members, ref_gradients(members, prefs, x, labels), state, lr, eps / WINDOW)
    _assert_members_close(_package_members(model, names), members, rtol=1e-9, atol=1e-11)
