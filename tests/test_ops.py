"""Properties of the HPR tensor math, checked against a naive float64 oracle."""

import math

import pytest
import torch

from hpr import ops


def _batch(cos_target: float, d: int = 512, n: int = 64, seed: int = 0):
    """Random activations h with cos(h, w) = cos_target exactly (up to rounding)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=g, dtype=torch.float64)
    w_hat = w / w.norm()
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    x = x - (x @ w_hat)[:, None] * w_hat  # orthogonal to w
    x = x / x.norm(dim=-1, keepdim=True)
    sin = math.sqrt(1 - cos_target**2)
    scale = torch.rand(n, 1, generator=g, dtype=torch.float64) * 50 + 1
    h = scale * (cos_target * w_hat + sin * x)
    return h, w


def _oracle_rotation(h: torch.Tensor, w: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Float64 matrix oracle: reflect with H = I - 2ww^T/|w|^2, then slerp by theta."""
    d = w.shape[-1]
    H = torch.eye(d, dtype=torch.float64) - 2 * torch.outer(w, w) / (w @ w)
    h_r = h @ H.T
    cos_g = ((h * h_r).sum(-1) / (h.norm(dim=-1) * h_r.norm(dim=-1))).clamp(-1, 1)
    gamma = torch.arccos(cos_g)
    return (torch.sin(theta)[:, None] * h_r + torch.sin(gamma - theta)[:, None] * h) / torch.sin(gamma)[:, None]


COSINES = [-0.9, -0.3, -0.05, -0.006, 0.006, 0.05, 0.3, 0.9]


@pytest.mark.parametrize("cos", COSINES)
def test_pseudo_rotate_matches_oracle_and_preserves_norm(cos):
    h64, w64 = _batch(cos)
    gamma = ops.reflection_angle(h64, w64)
    assert torch.allclose(gamma, torch.full_like(gamma, 2 * abs(math.asin(cos))), atol=1e-9)
    theta64 = torch.rand(h64.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * math.pi
    expected = _oracle_rotation(h64, w64, theta64)

    h, w, theta = h64.float(), w64.float(), theta64.float()
    out = ops.pseudo_rotate(h, w, theta)
    rel_norm = ops.relative_norm_change(out, h)
    assert rel_norm.max() < 1e-5
    # Within 1e-4 of the exact rotation (relative to ||h||).
    err = (out.double() - expected).norm(dim=-1) / h64.norm(dim=-1)
    assert err.max() < 1e-4, err.max()


def test_stable_where_the_paper_closed_form_is_not():
    """Near the hyperplane the paper's arccos / sin(gamma) form loses precision in fp32; ours does not."""
    h64, w64 = _batch(-0.001, d=4096)
    theta64 = torch.full((h64.shape[0],), 0.01, dtype=torch.float64)
    expected = _oracle_rotation(h64, w64, theta64)
    h, w, theta = h64.float(), w64.float(), theta64.float()
    h_r = ops.householder_reflect(h, w)
    cos_g = ((h * h_r).sum(-1) / (h.norm(dim=-1) * h_r.norm(dim=-1))).clamp(-1 + 1e-7, 1 - 1e-7)
    gamma = torch.arccos(cos_g)
    naive = (torch.sin(theta)[:, None] * h_r + torch.sin(gamma - theta)[:, None] * h) / torch.sin(gamma)[:, None]

    def rel_err(x):
        return ((x.double() - expected).norm(dim=-1) / h64.norm(dim=-1)).max().item()

    assert rel_err(naive) > 1e-4
    assert rel_err(ops.pseudo_rotate(h, w, theta)) < 1e-6


@pytest.mark.parametrize("cos", COSINES)
def test_reflection_is_involution_and_norm_preserving(cos):
    h, w = _batch(cos)
    r = ops.householder_reflect(h, w)
    assert torch.allclose(ops.householder_reflect(r, w), h, atol=1e-10)
    assert torch.allclose(r.norm(dim=-1), h.norm(dim=-1))
    # The reflection flips the sign of the normal component and keeps the rest.
    assert torch.allclose(r @ w, -(h @ w))
    assert torch.allclose(ops.householder_reflect(h, 7.5 * w), r)  # scale invariant


@pytest.mark.parametrize("cos", COSINES)
def test_theta_zero_is_identity_and_theta_gamma_is_reflection(cos):
    h, w = _batch(cos)
    h, w = h.float(), w.float()
    zero = torch.zeros(h.shape[0])
    assert torch.allclose(ops.pseudo_rotate(h, w, zero), h, rtol=1e-5, atol=1e-5)
    gamma = ops.reflection_angle(h, w)
    refl = ops.householder_reflect(h, w)
    out = ops.pseudo_rotate(h, w, gamma)
    assert ((out - refl).norm(dim=-1) / h.norm(dim=-1)).max() < 1e-5
    # The rotation angle is exactly theta.
    theta = torch.full((h.shape[0],), 0.3)
    assert torch.allclose(ops.vector_angle(ops.pseudo_rotate(h, w, theta), h), theta, atol=1e-4)


def test_any_leading_batch_shape():
    h, w = _batch(-0.2, d=32, n=24)
    h3 = h.float().reshape(2, 3, 4, 32)
    theta = torch.rand(2, 3, 4)
    out = ops.pseudo_rotate(h3, w.float(), theta)
    flat = ops.pseudo_rotate(h3.reshape(-1, 32), w.float(), theta.reshape(-1))
    assert out.shape == h3.shape
    assert torch.allclose(out.reshape(-1, 32), flat)
    assert ops.reflection_angle(h3, w.float()).shape == (2, 3, 4)


def test_degenerate_plane_still_rotates_by_theta():
    w = torch.tensor([0.0, 0.0, 1.0, 0.0])
    h = torch.tensor([[0.0, 0.0, -3.0, 0.0], [0.0, 0.0, 2.0, 0.0]])  # anti-parallel and parallel
    theta = torch.tensor([0.4, 1.0])
    out = ops.pseudo_rotate(h, w, theta)
    assert torch.isfinite(out).all()
    assert torch.allclose(out.norm(dim=-1), h.norm(dim=-1))
    assert torch.allclose(ops.vector_angle(out, h), theta, atol=1e-6)
    assert torch.allclose(ops.reflection_angle(h, w), torch.tensor([math.pi, math.pi]))


def test_on_hyperplane_rotates_towards_positive_side():
    w = torch.tensor([1.0, 0.0, 0.0])
    h = torch.tensor([[0.0, 2.0, 0.0]])
    out = ops.pseudo_rotate(h, w, torch.tensor([0.5]))
    assert (out @ w).item() > 0
    assert ops.reflection_angle(h, w).item() == 0.0


def test_hpr_edit_gates_on_probe_side():
    h, w = _batch(-0.3, d=16, n=8)
    pos, _ = _batch(0.3, d=16, n=8, seed=0)
    both = torch.cat([h, pos]).float()
    w = w.float()
    theta = torch.full((16,), 0.2)
    out = ops.hpr_edit(both, w, theta)
    assert torch.equal(out[8:], both[8:])  # positives untouched, bit for bit
    assert torch.allclose(out[:8], ops.pseudo_rotate(both[:8], w, theta[:8]))
    refl = ops.hpr_edit(both, w, None)
    assert torch.equal(refl[8:], both[8:])
    assert (refl[:8] @ w > 0).all()  # reflected negatives land on the positive side
    assert ops.negative_side(torch.zeros(1, 16), w).item()  # on the plane counts as negative


@pytest.mark.parametrize("cos", [-0.9995, -0.9, -0.3, -0.05, -0.006, -1e-4, 0.0])
def test_fast_rotation_of_negatives_matches_oracle(cos):
    """rotate_negatives (coefficient form; falls back near the normal) against the float64 oracle."""
    h64, w64 = _batch(cos, d=1024)
    theta64 = torch.rand(h64.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * math.pi
    expected = _oracle_rotation(h64, w64, theta64) if cos != 0.0 else None
    h, w, theta = h64.float(), w64.float(), theta64.float()
    out = ops.rotate_negatives(h, w, theta)
    assert ops.relative_norm_change(out, h).max() < 1e-5
    if expected is not None:
        reference = ops.pseudo_rotate(h, w, theta)
        assert ((out - reference).norm(dim=-1) / h.norm(dim=-1)).max() < 1e-5
        assert ((out.double() - expected).norm(dim=-1) / h64.norm(dim=-1)).max() < 1e-4
    else:  # on the hyperplane: rotated by theta towards the positive side
        assert torch.allclose(ops.vector_angle(out, h), theta, atol=1e-4)
        assert (out @ w > 0).all()


def test_angle_function_runs_on_negative_rows_only_and_matches_tensor_theta():
    neg, w = _batch(-0.2, d=64, n=6)
    pos, _ = _batch(0.2, d=64, n=5, seed=3)
    h = torch.cat([pos[:2], neg[:3], pos[2:], neg[3:]]).float().reshape(1, 11, 64)
    w = w.float()
    theta = torch.linspace(0.1, 2.0, 11).reshape(1, 11)
    seen = []

    def angle_of(rows):
        seen.append(rows.shape[0])
        return (rows @ w).abs() / (rows @ w).abs().max()  # any per-row function

    out = ops.hpr_edit(h, w, angle_of)
    assert seen == [6]  # called once, on the six negatives
    negative = ops.negative_side(h, w)
    expected = ops.hpr_edit(h, w, torch.where(negative, (h @ w).abs() / (h[negative] @ w).abs().max(), theta))
    torch.testing.assert_close(out, expected)
    assert torch.equal(out[~negative], h[~negative])
    assert torch.equal(ops.hpr_edit(pos.float(), w, angle_of), pos.float()) and seen == [6]  # none negative: no call


def test_vector_angle_is_accurate_for_tiny_angles():
    a = torch.tensor([1.0, 0.0])
    b = torch.tensor([1.0, 1e-4])
    assert torch.allclose(ops.vector_angle(a, b), torch.tensor(1e-4), rtol=1e-3)
    assert torch.allclose(ops.vector_angle(a, -a), torch.tensor(math.pi))
