"""kernels="compile" on the CPU, for real (inductor's C++ backend): one compile per batch shape,
none after, and the compiled step agrees with the uncompiled one. Slow: compiling even the tiny
UNet's step takes one to three minutes per shape on a 2-core CPU."""
import pytest
import torch

import idemrt
from idemrt.backends.base import StepSpec, create_backend
from idemrt.diffusion import DDPMSampler, Schedule
from tiny_models import tiny_unet

pytestmark = pytest.mark.slow


def test_compiles_once_per_shape_and_matches_the_uncompiled_step(monkeypatch, tmp_path):
    from torch._dynamo.utils import counters

    from idemrt.backends.compile_cache import ENV_VAR

    monkeypatch.setenv(ENV_VAR, str(tmp_path))  # the compile cache, not in the user's cache directory

    torch._dynamo.reset()
    counters.clear()
    sampler = DDPMSampler(Schedule.create(1000, respacing=4))
    spec = StepSpec(unet=tiny_unet(), operator=lambda x0: x0, codec=None, constraint="x", sampler=sampler,
                    guidance=idemrt.diffusion.DPS(scale=0.6))
    cpu = torch.device("cpu")
    compiled = create_backend("fast", spec, device=cpu, dtype=torch.float32, kernels="compile")
    plain = create_backend("fast", spec, device=cpu, dtype=torch.float32, kernels="torch")
    graphs = []
    gen = torch.Generator().manual_seed(0)
    for n in (1, 2, 1, 2, 2):
        x, noise = torch.randn(n, 3, 32, 32, generator=gen), torch.randn(n, 3, 32, 32, generator=gen)
        target = torch.rand(n, 3, 32, 32, generator=gen) * 2 - 1
        got_x, got_d = compiled.step(x, 3, target, noise)
        want_x, want_d = plain.step(x, 3, target, noise)
        graphs.append(counters["stats"]["unique_graphs"])
        # fp32: inductor reorders reductions and fuses, so agreement is to rounding, not bits
        torch.testing.assert_close(got_x, want_x, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got_d, want_d, rtol=1e-4, atol=1e-4)
    assert graphs[0] >= 1 and graphs[1] > graphs[0]  # a new batch shape compiles once more ...
    assert graphs[2:] == [graphs[1]] * 3  # ... and a seen shape never again
