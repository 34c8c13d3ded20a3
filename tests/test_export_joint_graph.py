"""The joint forward/backward trace: backward ops become forward ops, and the traced graph
computes autograd's input gradient for any batch size."""
import pytest
import torch
import torch.nn.functional as F

from idemrt.diffusion import DDPMSampler, Schedule
from idemrt.export.joint_graph import step_gradient_fn, trace

BACKWARD_OPS = ("backward", "scaled_dot_product", "upsample_nearest", "_unsafe_index", "scatter")


def _grad_fn(f):
    """x -> (f(x), d sum(f(x)·w) / dx) with a fixed cotangent w, as one function."""

    def fn(x, w):
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            y = f(x)
            (g,) = torch.autograd.grad((y * w).sum(), x)
        return y.detach(), g

    return fn


def _op_names(gm):
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}


CASES = {
    "conv_stride2_pad": lambda w: (lambda x: F.conv2d(x, w["c"], stride=2, padding=1), (2, 4, 16, 16)),
    "conv_stride2_odd": lambda w: (lambda x: F.conv2d(x, w["c"], stride=2, padding=1), (2, 4, 15, 15)),
    "conv_grouped_dilated": lambda w: (lambda x: F.conv2d(x, w["g"], padding=2, dilation=2, groups=2), (2, 4, 9, 9)),
    "conv_transpose_outpad": lambda w: (
        lambda x: F.conv_transpose2d(x, w["t"], stride=2, padding=2, output_padding=1), (2, 4, 5, 7)),
    "conv1d": lambda w: (lambda x: F.conv1d(x, w["c1"], padding=1), (2, 4, 11)),
    "avg_pool_nearest": lambda w: (
        lambda x: F.interpolate(F.avg_pool2d(x, 2), scale_factor=2.0, mode="nearest") * x, (2, 4, 8, 6)),
    "attention": lambda w: (
        lambda x: F.scaled_dot_product_attention(x, x * 0.5, x.flip(-1)), (2, 2, 7, 8)),
    "group_norm_silu_split": lambda w: (
        lambda x: F.silu(F.group_norm(x, 2)).split([1, 3], dim=1)[1].clamp(-0.5, 0.5), (2, 4, 6, 6)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_trace_matches_autograd_at_other_batch_sizes(case):
    g = torch.Generator().manual_seed(0)
    weights = {"c": torch.randn(6, 4, 3, 3, generator=g), "g": torch.randn(6, 2, 3, 3, generator=g),
               "t": torch.randn(4, 3, 5, 5, generator=g), "c1": torch.randn(5, 4, 3, generator=g)}
    f, shape = CASES[case](weights)
    fn = _grad_fn(f)
    x = torch.randn(shape, generator=g)
    w = torch.randn(fn(x, 1.0)[0].shape, generator=g)
    gm = trace(fn, (x, w), dynamic_axes=[(0,), (0,)])
    names = _op_names(gm)
    assert not [n for n in names if any(b in n for b in BACKWARD_OPS)], names
    for n in (1, 3):  # traced at batch 2, run at others
        xn, wn = torch.randn(n, *shape[1:], generator=g), torch.randn(n, *w.shape[1:], generator=g)
        want, got = fn(xn, wn), gm(xn, wn)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_step_gradient_fn_is_the_dps_gradient():
    """Against a hand-written float64 DPS gradient of a linear 'UNet' and operator: with
    eps = W x, x0 = clamp(a x - b W x), r = y - P x0: d||r||/dx = -(a - b W)^T (1_in · P^T r) / ||r||."""
    torch.manual_seed(0)
    n, d = 2, 12
    W, P = torch.randn(d, d, dtype=torch.float64) * 0.3, torch.randn(d, d, dtype=torch.float64)
    unet = lambda x, t: torch.cat([(x.flatten(1) @ W.T).view_as(x), torch.zeros_like(x)], 1)  # noqa: E731
    operator = lambda x0: (x0.flatten(1) @ P.T).view_as(x0)  # noqa: E731
    x = torch.randn(n, 3, 2, 2, dtype=torch.float64)
    target = torch.randn(n, 3, 2, 2, dtype=torch.float64)
    # The rows of a DDPM table: only the x0 coefficients (columns 0, 1) reach the gradient.
    sampler = DDPMSampler(Schedule.create(1000, 10))
    rows = torch.ones(n, len(sampler.columns), dtype=torch.float64)
    rows[:, 0], rows[:, 1] = 1.3, 0.8
    out, dist, grad = step_gradient_fn(unet, operator, sampler)(x, torch.zeros(n), target, rows)
    J = 1.3 * torch.eye(d, dtype=torch.float64) - 0.8 * W
    for k in range(n):
        u = J @ x[k].flatten()
        inside = (u.abs() < 1).to(torch.float64)
        r = target[k].flatten() - P @ u.clamp(-1, 1)
        assert 0 < inside.sum() < d  # some elements clamped, some not
        torch.testing.assert_close(dist[k], r.norm())
        torch.testing.assert_close(grad[k].flatten(), -J.T @ (inside * (P.T @ r)) / r.norm())
