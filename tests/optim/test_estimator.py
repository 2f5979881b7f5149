"""Statistical checks of the SPSA estimator through the whole optimizer step.

On a quadratic f(θ) = ½‖Aθ − b‖² the central difference is exact: g = ⟨∇f, z⟩, so one step
with lr = 1 moves θ by exactly ĝ = z zᵀ∇f. For z ~ N(0, I):
    E[ĝ_i] = a_i (a = ∇f),   Var[ĝ_i] = ‖a‖² + a_i²   (Isserlis: E[z_i² z_j²] = 1 + 2δ_ij).
With q queries per step ĝ averages q independent terms, so over N steps the sample mean of
coordinate i has standard deviation σ_i = sqrt((‖a‖² + a_i²) / (N q)). We require every
coordinate within 5σ_i (two-sided tail 5.7e-7 per coordinate; seeds are fixed, so the test is
deterministic, and an estimator that used different directions for the measurement and the
update would have mean 0, i.e. ≥ 20σ away at these sizes).
The forward difference adds (ε/2) z zᵀHz, whose mean is 0 (odd Gaussian moments) and whose
variance is O(ε²) = 1e-6 relative: the same tolerance holds.
"""

import math

import pytest
import torch

import zotune

D = 6


def quadratic():
    g = torch.Generator().manual_seed(7)
    A = torch.randn(10, D, generator=g, dtype=torch.float64)
    b = torch.randn(10, generator=g, dtype=torch.float64)
    theta0 = torch.randn(D, generator=g, dtype=torch.float64)
    grad = A.T @ (A @ theta0 - b)
    return A, b, theta0, grad


@pytest.mark.parametrize("num_queries,two_sided", [(1, True), (4, True), (1, False)])
def test_estimate_is_unbiased(num_queries, two_sided):
    A, b, theta0, grad = quadratic()
    theta = torch.nn.Parameter(theta0.clone())
    opt = zotune.mezo([theta], lr=1.0, eps=1e-3, num_queries=num_queries, two_sided=two_sided, seed=3)
    def closure():
        return 0.5 * ((A @ theta - b) ** 2).sum()
    n = 3000
    total = torch.zeros(D, dtype=torch.float64)
    for _ in range(n):
        with torch.no_grad():
            theta.copy_(theta0)
        opt.step(closure)
        total += theta0 - theta.detach()
    mean = total / n
    sigma = torch.sqrt((grad.pow(2).sum() + grad.pow(2)) / (n * num_queries))
    z_scores = (mean - grad).abs() / sigma
    assert z_scores.max() < 5.0, f"z-scores {z_scores.tolist()}"


def test_projected_gradient_is_directional_derivative():
    # For a quadratic, g must equal <grad, z> up to float64 rounding.
    A, b, theta0, grad = quadratic()
    theta = torch.nn.Parameter(theta0.clone())
    opt = zotune.mezo([theta], lr=0.0, eps=1e-3, seed=11)
    opt.step(lambda: 0.5 * ((A @ theta - b) ** 2).sum())
    (key,) = opt.draw_keys(0)
    z = opt.perturbation.coordinates(theta, 0, [(1.0, key)]).double()
    g = opt.last_record.projected_grads[0]
    # Central differences are exact on a quadratic; what is left is float64 rounding / ε.
    assert math.isclose(g, float(grad @ z), rel_tol=1e-9, abs_tol=1e-9)


@pytest.mark.parametrize("two_sided", [True, False])
@pytest.mark.parametrize("q", [1, 3])
def test_the_layout_of_measuring_points(two_sided, q):
    from zotune.optim import SPSA, DrawKey

    estimator = SPSA(eps=0.5, num_queries=q, two_sided=two_sided)
    keys = [DrawKey(0, 7, i) for i in range(q)]
    points = estimator.points(keys)
    assert len(points) == estimator.num_points(q) == (2 * q if two_sided else q + 1)
    assert estimator.queries_for(len(points)) == q
    for i, (offset, key) in enumerate(points):
        query = estimator.query_of(i)
        assert (offset == 0.0) == (query is None)  # only the one-sided base point is unperturbed
        assert query is None or key == keys[query]
    # g from losses: a loss that is linear in the offset gives g = its slope for every query
    losses = [1.0 + 2.0 * offset for offset, _ in points]
    assert estimator.projected_gradients(losses) == pytest.approx([2.0] * q)
    with pytest.raises(ValueError, match="whole queries"):  # an odd count two-sided; the base point alone one-sided
        estimator.queries_for(3 if two_sided else 1)
