import pytest
import torch

from pyxtask.hessian import conjugate_gradient, fd_hvp, hvp, hvp_function


def small_network(dtype=torch.float64, seed=0, convex=False):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = (
        torch.nn.Linear(6, 3)
        if convex
        else torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    )
    net = net.to(dtype)
    x = torch.randn(32, 6, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (32,), generator=g)
    params = list(net.parameters())
    return net, params, lambda: torch.nn.functional.cross_entropy(net(x), y)


def test_hvp_matches_the_full_hessian():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=g)

    def f(W):
        return torch.nn.functional.cross_entropy(torch.tanh(x @ W), y) + (W**4).sum()

    W = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    H = torch.autograd.functional.hessian(f, W.detach()).reshape(15, 15)
    v = torch.randn(5, 3, generator=g, dtype=torch.float64)
    (got,) = hvp(lambda: f(W), [W], [v])
    assert torch.allclose(got.reshape(-1), H @ v.reshape(-1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fd_hvp_approximates_hvp_and_restores_parameters_bit_for_bit(dtype):
    _, params, loss = small_network(dtype)
    before = [p.detach().clone() for p in params]
    v = [torch.randn_like(p) for p in params]
    exact = hvp(loss, params, v)
    approx = fd_hvp(loss, params, v, eps=1e-4 if dtype == torch.float64 else None)
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p.detach(), b)  # bit for bit
    num = torch.sqrt(sum(((a - e) ** 2).sum() for a, e in zip(approx, exact, strict=True)))
    den = torch.sqrt(sum((e**2).sum() for e in exact))
    assert float(num / den) < (1e-6 if dtype == torch.float64 else 2e-2)


def test_fd_hvp_restores_parameters_when_the_loss_raises():
    _, params, _ = small_network()
    before = [p.detach().clone() for p in params]
    calls = []

    def failing_loss():
        calls.append(1)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fd_hvp(failing_loss, params, [torch.ones_like(p) for p in params])
    assert calls and all(torch.equal(p.detach(), b) for p, b in zip(params, before, strict=True))


def test_conjugate_gradient_solves_an_spd_system():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(30, 30, generator=g, dtype=torch.float64)
    A = A @ A.T + 0.5 * torch.eye(30, dtype=torch.float64)
    b = torch.randn(30, generator=g, dtype=torch.float64)
    res = conjugate_gradient(lambda v: [A @ v[0]], [b], max_iter=200, tol=1e-10)
    assert res.converged and res.iterations <= 200 and res.residual <= 1e-10
    assert torch.allclose(res.x[0], torch.linalg.solve(A, b), rtol=1e-8, atol=1e-10)
    damped = conjugate_gradient(lambda v: [A @ v[0]], [b], damping=2.0, max_iter=200, tol=1e-10)
    expected = torch.linalg.solve(A + 2.0 * torch.eye(30, dtype=torch.float64), b)
    assert torch.allclose(damped.x[0], expected, rtol=1e-8, atol=1e-10)


def test_conjugate_gradient_with_network_hvp_satisfies_the_system():
    # Softmax regression: a PSD Hessian, SPD with damping, as CG needs.
    _, params, loss = small_network(convex=True)
    H = hvp_function(loss, params)
    b = [torch.randn_like(p) for p in params]
    res = conjugate_gradient(H, b, damping=0.1, max_iter=500, tol=1e-8)
    assert res.converged
    lhs = [h + 0.1 * x for h, x in zip(H(res.x), res.x, strict=True)]
    err = torch.sqrt(sum(((a - r) ** 2).sum() for a, r in zip(lhs, b, strict=True)))
    assert float(err) <= 1e-7 * float(torch.sqrt(sum((r**2).sum() for r in b)))


def test_conjugate_gradient_reports_non_convergence():
    A = torch.diag(torch.tensor([1.0, -1.0], dtype=torch.float64))  # indefinite
    res = conjugate_gradient(lambda v: [A @ v[0]], [torch.tensor([1.0, 1.0], dtype=torch.float64)])
    assert not res.converged


def test_hvp_rejects_mismatched_vectors():
    _, params, loss = small_network()
    with pytest.raises(ValueError, match=r"pyxtask\.hessian\.hvp: vector\[0\] has shape"):
        hvp(loss, params, [torch.zeros(1)] + [torch.zeros_like(p) for p in params[1:]])
