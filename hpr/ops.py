"""Pure tensor math shared by the editors. No model plumbing here.

Every function accepts any leading batch shape ``(..., d)``; vectors that define a
hyperplane (``normal``) broadcast against it. Callers cast to float32 first when
precision matters (HPR always does).

Geometry of HPR. For an activation ``h`` and a hyperplane through the origin with
normal ``w``, let ``a = cos(h, w)``. The Householder reflection ``h_r`` of ``h``
lies in the plane spanned by ``h`` and ``w`` and makes the angle
``gamma = 2 * |asin(a)|`` with ``h``. In high dimension ``|a|`` is typically
0.01-0.1, so ``gamma`` is small; the paper's closed form
``(sin(theta) h_r + sin(gamma - theta) h) / sin(gamma)`` then divides two small,
cancellation-prone numbers. We instead rotate in an explicit orthonormal basis
``(u, v)`` of the plane, which is exact to rounding for every ``a``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

# Below this |sin(h, w)| the plane of h and w is numerically undefined (h is
# parallel or anti-parallel to w); a fixed fallback direction is used instead.
_DEGENERATE_SIN = 1e-6


def unit(x: Tensor, eps: float = 1e-12) -> Tensor:
    """``x / ||x||`` along the last dim, with zero vectors left at zero."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def householder_reflect(h: Tensor, normal: Tensor) -> Tensor:
    """Reflect ``h`` about the hyperplane ``{x : normal . x = 0}``.

    ``h - 2 (normal . h / normal . normal) normal``; invariant to the scale of ``normal``.
    """
    n = unit(normal)
    return h - 2.0 * (h * n).sum(-1, keepdim=True) * n


def vector_angle(a: Tensor, b: Tensor) -> Tensor:
    """Angle in [0, pi] between ``a`` and ``b`` (last dim), accurate for tiny and near-pi angles.

    Uses ``2 atan2(|a^ - b^|, |a^ + b^|)`` (Kahan) rather than ``arccos`` of the cosine,
    which loses half the digits near 0 and pi.
    """
    ua, ub = unit(a), unit(b)
    return 2.0 * torch.atan2((ua - ub).norm(dim=-1), (ua + ub).norm(dim=-1))


def _rotation_plane(h: Tensor, normal: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Orthonormal basis of the plane of ``h`` and ``normal``.

    Returns ``(u, v, cos_hw, sin_hw)``: ``u = h^``; ``v`` is the unit vector in the plane,
    orthogonal to ``u``, pointing to the side of the hyperplane opposite to ``h``
    (towards ``+normal`` when ``h`` is on the hyperplane); ``cos_hw``/``sin_hw`` are the
    cosine and sine of the angle between ``h`` and ``normal`` (shape ``(...,)``).
    """
    u = unit(h)
    n = unit(normal).expand_as(u)
    cos_hw = (u * n).sum(-1)
    r = n - cos_hw.unsqueeze(-1) * u  # part of the normal orthogonal to h
    sin_hw = r.norm(dim=-1)
    # Degenerate plane (h parallel to the normal): any direction orthogonal to h is a
    # valid rotation axis; take the basis vector least aligned with h, orthogonalised.
    if bool((sin_hw < _DEGENERATE_SIN).any()):
        e = torch.zeros_like(u)
        e.scatter_(-1, u.abs().argmin(dim=-1, keepdim=True), 1.0)
        fallback = e - (e * u).sum(-1, keepdim=True) * u
        r = torch.where((sin_hw < _DEGENERATE_SIN).unsqueeze(-1), fallback, r)
    # "Opposite side": towards +normal when h is on the negative side or on the plane.
    side = torch.where(cos_hw > 0, -1.0, 1.0).to(u.dtype).unsqueeze(-1)
    v = side * unit(r)
    return u, v, cos_hw, sin_hw


def reflection_angle(h: Tensor, normal: Tensor) -> Tensor:
    """``gamma``: the angle between ``h`` and its Householder reflection, shape ``(...,)``.

    ``gamma = 2 |asin(cos(h, normal))|``, computed with ``atan2`` for stability.
    """
    _, _, cos_hw, sin_hw = _rotation_plane(h, normal)
    return 2.0 * torch.atan2(cos_hw.abs(), sin_hw)


def pseudo_rotate(h: Tensor, normal: Tensor, theta: Tensor) -> Tensor:
    """Rotate ``h`` by ``theta`` (radians, shape ``h.shape[:-1]``) towards its reflection.

    The rotation is in the plane of ``h`` and its Householder reflection (the plane of
    ``h`` and ``normal``), so ``theta = 0`` is the identity, ``theta = gamma`` is the
    reflection (see :func:`reflection_angle`) and the norm is always preserved.
    Unconditional: no probe gating (see :func:`hpr_edit`).
    """
    u, v, _, _ = _rotation_plane(h, normal)
    norm = h.norm(dim=-1, keepdim=True)
    theta = theta.to(h.dtype).unsqueeze(-1)
    return norm * (torch.cos(theta) * u + torch.sin(theta) * v)


def negative_side(h: Tensor, normal: Tensor) -> Tensor:
    """Boolean mask ``normal . h <= 0``: the activations HPR edits.

    The official code edits iff ``round(sigmoid(w.h)) == 0``; torch rounds 0.5 to even,
    so a point exactly on the hyperplane is edited too.
    """
    return (h @ unit(normal.to(h.dtype))) <= 0


# Below this |sin(h, normal)| the fast rotation defers to :func:`pseudo_rotate`: its coefficients grow
# like 1/sin, and so does their rounding error (here at most ~40 ulp, well inside the 1e-5 norm budget).
_FAST_MIN_SIN = 0.05


def rotate_negatives(
    h: Tensor, normal: Tensor, theta: Tensor, *, unit_normal: bool = False, projection: Tensor | None = None
) -> Tensor:
    """:func:`pseudo_rotate` for activations with ``normal . h <= 0``, in a handful of passes over ``h``.

    For those, the plane's second basis vector is ``v = (n - c u) / s`` (``n`` the unit normal,
    ``c``/``s`` the cosine/sine of the angle of ``h`` and ``n``), so the rotation is a combination of
    ``h`` and the normal with per-row coefficients:
    ``|h| (cos t u + sin t v) = (cos t - c sin t / s) h + (|h| sin t / s) n``.
    No ``[..., d]`` temporaries besides the output; rows too close to the normal (``s`` below
    ``_FAST_MIN_SIN``) make the whole call fall back to the basis construction. Callers that already
    have them pass the unit normal (``unit_normal=True``) and ``projection = h @ n``.
    """
    n = normal.to(h.dtype) if unit_normal else unit(normal.to(h.dtype))
    norm = torch.linalg.vector_norm(h, dim=-1)
    c = (h @ n if projection is None else projection) / norm.clamp_min(1e-12)
    s = (1 - c * c).clamp_min(0).sqrt()
    if bool((s < _FAST_MIN_SIN).any()):
        return pseudo_rotate(h, n, theta)
    theta = theta.to(h.dtype)
    k = torch.sin(theta) / s
    a = torch.cos(theta) - k * c
    return torch.addcmul(h * a.unsqueeze(-1), (k * norm).unsqueeze(-1), n)


def hpr_edit(
    h: Tensor, normal: Tensor, theta: Tensor | Callable[[Tensor], Tensor] | None, *, unit_normal: bool = False
) -> Tensor:
    """The HPR edit: activations on the negative side of the probe are pseudo-rotated.

    ``theta`` is the angle of every activation (shape ``h.shape[:-1]``), or a function from the
    negative-side rows ``[m, d]`` to their angles ``[m]``, so that an angle network runs only where its
    output is used. ``theta=None`` is the "no angle" ablation: a plain Householder reflection.
    Positive-side activations are returned unchanged (bit for bit). ``unit_normal=True`` says that
    ``normal`` is already unit length (editors normalise once, not on every call).
    """
    n = normal.to(h.dtype) if unit_normal else unit(normal.to(h.dtype))
    projection = h @ n
    negative = projection <= 0  # the gate of negative_side, on the unit normal
    if theta is None:
        return torch.where(negative.unsqueeze(-1), torch.addcmul(h, projection.unsqueeze(-1), n, value=-2.0), h)
    if not callable(theta):
        edited = rotate_negatives(h, n, theta, unit_normal=True, projection=projection)
        return torch.where(negative.unsqueeze(-1), edited, h)
    flat, rows = h.reshape(-1, h.shape[-1]), negative.reshape(-1).nonzero().squeeze(1)
    if rows.numel() == 0:
        return h.clone()
    picked = flat.index_select(0, rows)
    edited = rotate_negatives(
        picked, n, theta(picked), unit_normal=True, projection=projection.reshape(-1).index_select(0, rows)
    )
    return flat.index_copy(0, rows, edited).reshape(h.shape)


def relative_norm_change(edited: Tensor, base: Tensor, eps: float = 1e-12) -> Tensor:
    """``| ||edited|| - ||base|| | / ||base||`` per vector, shape ``(...,)``."""
    base_norm = base.norm(dim=-1)
    return (edited.norm(dim=-1) - base_norm).abs() / base_norm.clamp_min(eps)
