"""Bad input fails loudly and early; a non-finite loss is never applied."""

import math

import pytest
import torch

import zotune
from zotune.optim import Gaussian


def param():
    return torch.nn.Parameter(torch.linspace(-1, 1, 12).reshape(3, 4))


@pytest.mark.parametrize("bad", [lambda p: p * 2, lambda p: "1.0", lambda p: None, lambda p: torch.ones(2)])
def test_closure_must_return_a_scalar(bad):
    p = param()
    opt = zotune.mezo([p], lr=0.1)
    with pytest.raises(TypeError, match="scalar"):
        opt.step(lambda: bad(p))


@pytest.mark.parametrize("path", ["in place", "drift-safe"])
def test_losses_read_back_once_a_step_are_the_values_each_forward_returned(path):
    # The in-place and drift-safe paths read a step's losses back after its last forward; a closure that
    # returns the same buffer each time, overwritten by its next call, still gives each point's own loss,
    # in the loss's own dtype (float16 here, exact in a Python float), and micro-batches are averaged.
    model = torch.nn.Linear(4, 3)
    x = torch.linspace(-1, 1, 8).reshape(2, 4)
    buffer = torch.zeros((), dtype=torch.float16)
    calls = []

    def closure():
        calls.append(float((model(x) ** 2).sum()))
        buffer.fill_(calls[-1])
        return buffer

    execution = zotune.DriftSafe(model) if path == "drift-safe" else zotune.InPlace()
    opt = zotune.mezo(model.parameters(), lr=0.0, eps=0.1, execution=execution)
    first = opt.step([closure, closure])
    record = opt.last_record
    halves = [float(torch.tensor(c, dtype=torch.float16)) for c in calls]
    assert record.losses == ((halves[0] + halves[1]) / 2, (halves[2] + halves[3]) / 2)
    assert record.losses[0] != record.losses[1] and first == record.losses[0]


def test_step_needs_a_closure():
    opt = zotune.mezo([param()], lr=0.1)
    with pytest.raises(TypeError, match="closure"):
        opt.step([])


def test_no_trainable_parameters():
    p = torch.nn.Parameter(torch.ones(3), requires_grad=False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        zotune.mezo([p], lr=0.1)


@pytest.mark.parametrize("eps", [0.0, -1e-3, float("nan")])
def test_eps_must_be_positive(eps):
    with pytest.raises(ValueError, match="eps"):
        zotune.mezo([param()], lr=0.1, eps=eps)


@pytest.mark.parametrize("kwargs,match", [
    ({"lr": -1.0}, "lr"), ({"lr": 0.1, "weight_decay": -0.1}, "weight_decay"),
    ({"lr": 0.1, "num_queries": 0}, "num_queries"), ({"lr": 0.1, "nan_policy": "ignore"}, "nan_policy"),
    ({"lr": 0.1, "seed": -3}, "seed"), ({"lr": 0.1, "seed": "3"}, "seed"), ({"lr": 0.1, "seed": 2.5}, "seed"),
    ({"lr": 0.1, "seed": True}, "seed"),
])
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        zotune.mezo([param()], **kwargs)


def test_execution_paths_are_checked():
    with pytest.raises(TypeError, match="execution must be an execution path"):
        zotune.mezo([param()], lr=0.1, execution="drift_safe")
    with pytest.raises(TypeError, match="nn.Module"):
        zotune.DriftSafe(None)
    model = torch.nn.Linear(3, 4)
    shared = zotune.InPlace()
    zotune.mezo(model.parameters(), lr=0.1, execution=shared)
    with pytest.raises(ValueError, match="already serves an optimizer"):
        zotune.mezo(model.parameters(), lr=0.1, execution=shared)


def test_separable_adam_needs_temporal_cp_directions():
    # SeparableAdam's update expands r-vector moments through TemporalCP's U and V; with any other
    # perturbation it used to fail with an AttributeError at the first update.
    from zotune.optim import SPSA, Gaussian, LowRank, SeparableAdam, ZOOptimizer

    for perturbation in (Gaussian(), LowRank(rank=2)):
        with pytest.raises(ValueError, match="SeparableAdam .* needs a TemporalCP"):
            ZOOptimizer([param()], lr=0.1, perturbation=perturbation, estimator=SPSA(), rule=SeparableAdam())


def test_bad_rule_hyperparameters():
    with pytest.raises(ValueError, match="beta"):
        zotune.mezo_momentum([param()], lr=0.1, beta=1.0)
    with pytest.raises(ValueError, match="form"):
        zotune.mezo_momentum([param()], lr=0.1, form="nesterov")
    with pytest.raises(ValueError, match="beta1"):
        zotune.mezo_adam([param()], lr=0.1, betas=(1.5, 0.9))
    with pytest.raises(ValueError, match="chunk"):
        Gaussian(chunk_numel=0)


def nan_after_perturbation(p, clean):
    # Finite at θ, NaN once the weights move: the perturbed measurement is what fails.
    return lambda: torch.tensor(float("nan")) if not torch.equal(p.detach(), clean) else p.sum()


def test_nan_loss_raises_and_restores():
    p = param()
    clean = p.detach().clone()
    opt = zotune.mezo([p], lr=0.1, eps=0.5)
    with pytest.raises(zotune.NonFiniteLossError, match="restored"):
        opt.step(nan_after_perturbation(p, clean))
    assert torch.allclose(p.detach(), clean, atol=1e-6)
    assert opt.num_skipped == 1


@pytest.mark.parametrize("method", sorted(n for n, spec in zotune.METHODS.items() if spec.zeroth_order))
def test_nan_loss_skip_leaves_weights_and_state(method):
    p = param()
    clean = p.detach().clone()
    opt = zotune.METHODS[method]([p], lr=0.1, eps=0.5, nan_policy="skip",
                                 execution=zotune.DriftSafe(torch.nn.ParameterList([p])))
    loss = opt.step(lambda: torch.tensor(float("inf")))
    assert math.isinf(loss)
    assert torch.equal(p.detach(), clean)
    assert opt.num_skipped == 1 and opt.num_steps == 1 and opt.last_record.skipped
    assert not opt.state[p]  # no moment was touched


def test_drift_safe_needs_owned_parameters():
    p = param()
    with pytest.raises(ValueError, match="belong to a module"):
        zotune.mezo([p], lr=0.1, execution=zotune.DriftSafe(torch.nn.Linear(2, 2)))


def test_load_state_dict_rejects_foreign_state():
    p = param()
    opt = zotune.mezo([p], lr=0.1)
    sgd = torch.optim.SGD([p], lr=0.1)
    with pytest.raises(ValueError, match="not a ZOOptimizer state"):
        opt.load_state_dict(sgd.state_dict())


def test_load_state_dict_rejects_another_methods_state():
    # a resume with the wrong optimizer would otherwise run on: LOZO ignoring ZO-Adam's moments
    p = param()
    adam = zotune.mezo_adam([p], lr=0.1)
    adam.step(lambda: (p ** 2).sum())
    with pytest.raises(ValueError, match="Gaussian directions and the Adam rule; this one has LowRank and SGD"):
        zotune.lozo([p], lr=0.1).load_state_dict(adam.state_dict())
    with pytest.raises(ValueError, match="not a ZOOptimizer state"):
        zotune.mezo([p], lr=0.1).load_state_dict({"x": 1})
    zotune.mezo_adam([p], lr=0.1).load_state_dict(adam.state_dict())  # the same composition loads


def test_a_parameter_given_twice_is_refused():
    # torch only warns when a group repeats a tensor; the step would perturb and update it twice
    p = param()
    with pytest.raises(ValueError, match="given twice"):
        zotune.mezo([p, p], lr=0.1)


def test_add_param_group_after_construction_is_refused():
    # The trainable set is laid out when the optimizer is built: a group added later would never move.
    p, q = param(), param()
    opt = zotune.mezo([p], lr=0.1)
    with pytest.raises(ValueError, match="build a new optimizer"):
        opt.add_param_group({"params": [q]})
    zotune.mezo([{"params": [p]}, {"params": [q], "lr": 0.5}], lr=0.1)  # groups given at once are fine


@pytest.mark.parametrize("change, said", [("freeze", "frozen"), ("unfreeze", "unfrozen")])
def test_changing_requires_grad_after_construction_stops_the_step(change, said):
    # A parameter frozen after construction would still be perturbed and updated, one unfrozen would not:
    # the step refuses before touching any weight, and names the parameter by its order in the groups.
    p, q = param(), param()
    q.requires_grad_(change == "freeze")
    opt = zotune.mezo([p, q], lr=0.1, eps=0.1)
    before = (p.detach().clone(), q.detach().clone())
    q.requires_grad_(change != "freeze")
    with pytest.raises(ValueError, match=rf"\({said} since: parameters 1 \(shape 3x4\); by their order"):
        opt.step(lambda: (p * q).sum())
    assert torch.equal(p, before[0]) and torch.equal(q, before[1])
    assert opt.num_steps == 0
    q.requires_grad_(change == "freeze")  # set back: the step runs
    opt.step(lambda: (p * q).sum())
    assert opt.num_steps == 1
