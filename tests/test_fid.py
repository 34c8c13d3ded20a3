"""FID/KID (idemrt.fid): the feature network against pytorch-fid's own module, the statistics against
closed forms and brute force, and the weight file's error paths."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from idemrt import CheckpointError
from idemrt.fid import (
    PatchScores,
    frechet_distance,
    kernel_inception_distance,
    load_inception,
    patches,
    polynomial_mmd2,
    statistics,
)
from tiny_models import random_inception_state

FILE_NAME = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid's name; its "-6726825d" is no sha256 pin


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    state = random_inception_state()
    path = tmp_path_factory.mktemp("inception") / FILE_NAME
    torch.save(state, path)
    return path, state


@pytest.fixture(scope="module")
def inception(weights):
    return load_inception(weights[0])


def test_features_equal_pytorch_fid(weights, inception, monkeypatch):
    """Our InceptionFeatures equals pytorch-fid's InceptionV3 (block 3, resize and normalize on) with the
    same weights: pytorch-fid's downloader is replaced by the local state_dict for this comparison."""
    import pytorch_fid.inception as pf

    monkeypatch.setattr(pf, "load_state_dict_from_url", lambda *a, **k: weights[1])
    reference = pf.InceptionV3([3]).eval()
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(x)[0].flatten(1)
    got = inception(x)
    assert got.shape == (3, 2048)
    assert got.std() > 0.1 and (got[0] - got[1]).abs().max() > 1e-3  # the features see the images
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_patches_are_unfold_order():
    x = torch.arange(2 * 3 * 130 * 200, dtype=torch.float32).reshape(2, 3, 130, 200)
    p = patches(x, 64)
    assert p.shape == (2 * 2 * 3, 3, 64, 64)  # 130x200 -> 2 rows x 3 columns; remainders dropped
    for n, row, col in itertools.product(range(2), range(2), range(3)):
        torch.testing.assert_close(p[n * 6 + row * 3 + col], x[n, :, 64 * row:64 * row + 64, 64 * col:64 * col + 64],
                                   rtol=0, atol=0)
    assert patches(torch.rand(1, 3, 63, 200), 64).shape[0] == 0


def test_statistics_float64_reference():
    f = torch.randn(50, 7, generator=torch.Generator().manual_seed(2)) * 3 + 1
    mu, sigma = statistics(f)
    ref = np.cov(f.double().numpy(), rowvar=False)  # (N-1) denominator
    np.testing.assert_allclose(sigma.numpy(), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mu.numpy(), f.double().mean(0).numpy(), rtol=1e-6, atol=1e-6)


def test_frechet_distance_closed_form():
    """Diagonal covariances: d² = ||mu1-mu2||² + sum (sqrt(a) - sqrt(b))²."""
    rng = np.random.default_rng(3)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    a, b = rng.uniform(0.1, 4, size=5), rng.uniform(0.1, 4, size=5)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)
    # A rotation of both covariances leaves the distance unchanged (the trace of sqrtm of a non-diagonal product).
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    got = frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-7)
    assert frechet_distance(mu1, np.diag(a), mu1, np.diag(a)) == pytest.approx(0, abs=1e-9)


@pytest.mark.parametrize("samples", [6, 500])  # singular (fewer samples than dimensions: the demo's case) and full rank
def test_frechet_distance_equals_scipy_sqrtm(samples):
    """The paper's formula with scipy's sqrtm (docs/reference_code.md §3.4.3: 1e-6·I if not finite,
    imaginary part dropped)."""
    from scipy import linalg

    g = torch.Generator().manual_seed(4)
    f1, f2 = torch.randn(samples, 40, generator=g), torch.randn(samples, 40, generator=g) * 1.5 + 0.5
    (mu1, s1), (mu2, s2) = (tuple(t.double().numpy() for t in statistics(f)) for f in (f1, f2))
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        eps = np.eye(40) * 1e-6
        covmean = linalg.sqrtm((s1 + eps) @ (s2 + eps))
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real)
    got = frechet_distance(mu1, s1, mu2, s2)
    assert math.isfinite(got) and got > 0
    assert got == pytest.approx(expected, rel=1e-6)


def test_mmd_brute_force():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(6, 3)), rng.normal(size=(6, 3)) + 0.3

    def k(u, v):
        return (u @ v / 3 + 1) ** 3

    m = 6
    xx = sum(k(a[i], a[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(b[i], b[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(a[i], b[j]) for i in range(m) for j in range(m)) / m**2
    assert polynomial_mmd2(a, b) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)


def test_kid_separates_distributions():
    g = torch.Generator().manual_seed(6)
    same1, same2 = torch.randn(300, 16, generator=g), torch.randn(300, 16, generator=g)
    shifted = torch.randn(300, 16, generator=g) + 1.0
    near, near_std = kernel_inception_distance(same1, same2, subsets=20, subset_size=100)
    far, _ = kernel_inception_distance(same1, shifted, subsets=20, subset_size=100)
    assert abs(near) < 3 * near_std + 1e-3  # unbiased: centred on 0 for equal distributions
    assert far > 10 * max(abs(near), near_std)
    assert kernel_inception_distance(same1, same2, subsets=5, seed=1) == kernel_inception_distance(
        same1, same2, subsets=5, seed=1)
    with pytest.raises(ValueError, match="at least 2"):
        kernel_inception_distance(same1[:1], same2)


def test_patch_scores_end_to_end(inception):
    g = torch.Generator().manual_seed(7)
    x = torch.rand(2, 3, 128, 128, generator=g)
    noisy = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    scores = PatchScores(inception)
    assert scores.add("original", x) == 8
    scores.add("same", x.clone())
    scores.add("noisy", noisy)
    assert scores.fid("original", "same") == pytest.approx(0, abs=1e-2)
    assert scores.fid("original", "noisy") > 1e-2
    kid, _ = scores.kid("original", "noisy", subsets=10)
    assert math.isfinite(kid)
    with pytest.raises(ValueError, match="at least 2 patches"):
        scores.fid("original", "missing")


def test_weight_file_errors(weights, tmp_path):
    with pytest.raises(CheckpointError, match="not found.*\n.*pytorch-fid"):
        load_inception(tmp_path / "absent.pth")
    bad = dict(weights[1])
    bad["fc.weight"] = torch.zeros(1000, 2048)  # torchvision's ImageNet head, not the FID network's
    bad.pop("Mixed_7c.branch_pool.conv.weight")
    torch.save(bad, tmp_path / "torchvision.pth")
    with pytest.raises(CheckpointError, match="Mixed_7c.branch_pool.conv.weight.*fc.weight"):
        load_inception(tmp_path / "torchvision.pth")
    with pytest.raises(CheckpointError, match="sha256"):
        load_inception(weights[0], sha256="00000000")


def test_old_files_without_batchnorm_counters_load(weights, tmp_path):
    state = {k: v for k, v in weights[1].items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "old.pth")
    x = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(load_inception(tmp_path / "old.pth")(x), load_inception(weights[0])(x))
