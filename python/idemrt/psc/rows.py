"""The deterministic row recipe: top-r principal directions of the posterior samples.

Encoder and decoder must derive bit-identical rows from bit-identical samples, so the recipe
avoids everything whose result is not pinned down by its input (docs/reference_code.md §4.3):

1. float64 on the CPU, under one intra-op thread (multi-threaded BLAS splits long reductions
   across threads, so results would depend on ``torch.get_num_threads()``);
2. C = X - mean(X), G = C Cᵀ (s x s), ``eigh(G)``: eigenpairs in decreasing order;
3. v_i = Cᵀ u_i / sqrt(λ_i) (unit norm: the right singular vectors of C);
4. Gram-Schmidt against H block by block (blocks of 16 rows in order, each projected out
   twice: block-modified Gram-Schmidt with reorthogonalization), then modified Gram-Schmidt
   twice among the new rows;
5. sign: the entry of largest magnitude is positive (the lowest index on ties);
6. one cast to float32; the decoder's pseudo-inverse is then Hᵀ.

Mathematically this is the truncated SVD of C (up to sign): centred samples that satisfy Hx = y
already lie in null(H); step 4 only removes float32 residue. :func:`rows_digest` hashes the rows
so a decoder whose arithmetic drifted notices.
"""
from __future__ import annotations

import contextlib
import hashlib

import torch

from ..errors import IdemrtError

# Rows of H per Gram-Schmidt block: small enough (25 MB at 256²) that the block's second
# projection may find it in cache; the recipe is memory-bound (H streams through per round).
BLOCK = 16
# A direction is usable when its singular value is not negligible against the largest one.
_REL_EIG = 1e-12
_MIN_RESIDUAL = 1e-3


class DegenerateSamplesError(IdemrtError):
    """The posterior samples do not span r new directions (e.g. the model ignores its noise)."""


@contextlib.contextmanager
def one_thread():
    """Run the enclosed torch CPU work on one intra-op thread (restored afterwards).

    The setting is process-wide: torch CPU work of other Python threads meanwhile also runs on one
    thread, which can change its last bits (a CPU PSC decode must not run concurrently with
    another thread's PSC work; docs/psc.md).
    """
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def principal_rows(samples: torch.Tensor, basis: torch.Tensor, r: int) -> torch.Tensor:
    """The r new float32 rows (r, n) from samples (s, n) and the current rows ``basis`` (m, n).

    ``basis`` holds float32 rows, as float32 or (exactly) as float64; a float64 copy kept by the
    caller saves converting it every round. Raises DegenerateSamplesError if the samples do not
    span r directions outside span(basis).
    """
    s, n = samples.shape
    if not 1 <= r <= s - 1:
        raise ValueError(f"need 1 <= r <= s - 1 (centred samples have rank <= s - 1), got r={r}, s={s}")
    if basis.dtype not in (torch.float32, torch.float64) or basis.ndim != 2 or basis.shape[1] != n:
        raise ValueError(f"basis must be float32 or float64 (m, {n}), got {basis.dtype} {tuple(basis.shape)}")
    with one_thread(), torch.no_grad():
        x = samples.detach().to("cpu", torch.float64)
        if not torch.isfinite(x).all():
            raise DegenerateSamplesError("the posterior samples contain non-finite values")
        c = x - x.mean(dim=0)
        lam, u = torch.linalg.eigh(c @ c.T)
        lam, u = lam.flip(0)[:r], u.flip(1)[:, :r]
        if not lam[-1] > _REL_EIG * max(float(lam[0]), 0.0):
            raise DegenerateSamplesError(
                f"the {s} posterior samples span fewer than r={r} directions (eigenvalues {lam.tolist()}); "
                f"the model may ignore its input noise"
            )
        v = (u.T @ c) / lam.sqrt()[:, None]
        basis = basis.to("cpu")
        for start in range(0, basis.shape[0], BLOCK):
            hb = basis[start:start + BLOCK].double()
            for _ in range(2):
                v -= (v @ hb.T) @ hb
        for _ in range(2):
            for i in range(r):
                for j in range(i):
                    v[i] -= (v[j] @ v[i]) * v[j]
                norm = torch.linalg.vector_norm(v[i])
                if not norm > _MIN_RESIDUAL:
                    raise DegenerateSamplesError(
                        f"principal direction {i} lies inside the span of the rows already sent "
                        f"(residual norm {float(norm):.3g})"
                    )
                v[i] /= norm
        return fix_signs(v).to(torch.float32)


def fix_signs(v: torch.Tensor) -> torch.Tensor:
    """Flip each row so that its entry of largest magnitude (the first one on ties) is positive."""
    lead = v.abs().argmax(dim=1)  # torch returns the first maximal index
    return v * torch.sign(v.gather(1, lead[:, None]))


def rows_digest(hasher: hashlib._Hash, rows: torch.Tensor) -> None:
    """Feed the float32 little-endian bytes of ``rows`` into ``hasher``."""
    if rows.dtype != torch.float32:
        raise ValueError(f"rows must be float32, got {rows.dtype}")
    hasher.update(rows.detach().cpu().contiguous().numpy().astype("<f4", copy=False).tobytes())
