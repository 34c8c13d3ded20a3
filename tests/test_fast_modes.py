"""Fast decoding modes: warm start, codec-gradient (PIR) guidance, exact idempotence, speed presets.

References are independent: the proximal data step against its closed form in float64 (a fixed
random matrix as the operator), the PIR update and the warm start against formulas written here
from the float64 schedule, and start=1 against today's decode bit for bit.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import idemrt
from idemrt.diffusion import DDPMSampler, PIR, Schedule, finish_proximal, proximal_step
from idemrt.exact import exact_idempotence, symbols_equal
from idemrt.speeds import SPEEDS, resolve_speed
from tiny_models import tiny_codec, tiny_unet

H = W = 32


@pytest.fixture(scope="module")
def models():
    return tiny_unet(), tiny_codec()


@pytest.fixture(scope="module")
def data(models):
    torch.manual_seed(3)
    image = F.interpolate(torch.rand(1, 3, 8, 8), size=(H, W), mode="bilinear", align_corners=False)
    return idemrt.Encoder(models[1]).encode(image)


class NoBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        raise AssertionError("the UNet was differentiated")


class ForwardOnlyUNet(torch.nn.Module):
    """The UNet whose backward raises: PIR must never differentiate it."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x, t):
        return NoBackward.apply(self.inner(x, t))


# --- the proximal data step -----------------------------------------------------------------------

def _linear_case(n=2, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    # Singular values in [0.3, 1]: ||M|| = 1 (jac_norm2 = 1 is its true value), and gradient descent
    # converges in a few hundred steps even where ρ is small.
    m = u @ torch.diag(torch.linspace(0.3, 1.0, d, dtype=torch.float64)) @ v.T
    x0 = torch.randn(n, 3, 2, 2, generator=g, dtype=torch.float64)
    target = torch.randn(n, 3, 2, 2, generator=g, dtype=torch.float64)
    operator = lambda z: (z.flatten(1) @ m.T).view_as(z)  # noqa: E731
    return m, x0, target, operator


@pytest.mark.parametrize("recipm1", [0.5, 2.0])
def test_data_step_converges_to_the_closed_form_proximal_point(recipm1):
    m, x0, target, operator = _linear_case()
    lam = 0.3
    rows = torch.tensor([[1.0, recipm1, 0.0], [1.0, 2 * recipm1, 0.0]], dtype=torch.float64)
    pir = PIR(iters=400, lam=lam, jac_norm2=1.0, clip=False)
    got, dist = pir.data_step(operator, x0, target, rows)
    for k in range(2):
        rho = lam / rows[k, 1] ** 2
        # argmin ½||Mz - y||² + ½ρ||z - x0||²  =  (MᵀM + ρI)⁻¹ (Mᵀy + ρ x0)
        want = torch.linalg.solve(m.T @ m + rho * torch.eye(12, dtype=torch.float64),
                                  m.T @ target[k].flatten() + rho * x0[k].flatten())
        assert torch.allclose(got[k].flatten(), want, atol=1e-10)
        assert math.isclose(float(dist[k]), float((target[k].flatten() - m @ want).norm()), rel_tol=1e-9)


def test_one_step_is_exact_for_the_identity():
    g = torch.Generator().manual_seed(1)
    x0, y = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    rows = torch.tensor([1.0, 0.7, 0.0], dtype=torch.float64)
    got, _ = PIR(iters=1, lam=0.2, jac_norm2=1.0, clip=False).data_step(lambda z: z, x0, y, rows)
    rho = 0.2 / 0.7**2
    assert torch.allclose(got, (y + rho * x0) / (1 + rho), atol=1e-12)
    assert torch.equal(PIR(iters=0, clip=False).data_step(lambda z: z, x0, y, rows)[0], x0)


@pytest.mark.parametrize("bad", [dict(iters=-1), dict(iters=1.5), dict(lam=-1.0), dict(zeta=1.5),
                                 dict(jac_norm2=0.0), dict(step_size=float("nan"))])
def test_bad_pir_options(bad):
    with pytest.raises(ValueError):
        PIR(**bad)


# --- the PIR step -----------------------------------------------------------------------------------

def _step_inputs(codec, n=2, seed=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, H, W, generator=g)
    noise = torch.randn(n, 3, H, W, generator=g)
    op = idemrt.models.codec.diffusion_operator(codec, "x")
    with torch.no_grad():
        target = op(torch.rand(n, 3, H, W, generator=g) * 2 - 1)
    return x, noise, target, op


def test_finish_proximal_is_the_formula():
    schedule = Schedule.create(1000, 10)
    sampler = DDPMSampler(schedule)
    g = torch.Generator().manual_seed(0)
    x_t, x0, noise = (torch.randn(3, 3, 4, 4, generator=g) for _ in range(3))
    i = torch.tensor([7, 0, 3])
    pir = PIR(zeta=0.3)
    got = finish_proximal(sampler, pir, x_t, x0, noise, i, sampler.rows(i))
    for k, step in enumerate(i.tolist()):
        abar, abar_prev = schedule.alphas_cumprod[step], schedule.alphas_cumprod_prev[step]
        eps_hat = (x_t[k].double() - math.sqrt(abar) * x0[k].double()) / math.sqrt(1 - abar)
        want = math.sqrt(abar_prev) * x0[k].double() + math.sqrt(1 - abar_prev) * (
            math.sqrt(0.7) * eps_hat + math.sqrt(0.3) * noise[k].double())
        assert torch.allclose(got[k].double(), want, rtol=1e-4, atol=1e-5)
    assert torch.allclose(got[1], x0[1], atol=1e-6)  # the last step returns x0'


def test_sqrt_abar_prev_per_sample_and_int():
    schedule = Schedule.create(1000, 25)
    sampler = DDPMSampler(schedule)
    i = torch.tensor([0, 1, 24, 13])
    want = torch.tensor([math.sqrt(a) for a in schedule.alphas_cumprod_prev[[0, 1, 24, 13]]])
    assert torch.allclose(sampler.sqrt_abar_prev(i).double(), want.double(), rtol=1e-6)
    assert [float(sampler.sqrt_abar_prev(int(k))) for k in i] == sampler.sqrt_abar_prev(i).tolist()


def test_pir_never_differentiates_the_unet_and_samples_are_independent(models):
    unet, codec = models
    sampler = DDPMSampler(Schedule.create(1000, 10))
    pir = PIR(iters=2, lam=0.1)
    x, noise, target, op = _step_inputs(codec)
    model = ForwardOnlyUNet(unet)
    i = torch.tensor([8, 3])
    both, dist = proximal_step(model, op, sampler, pir, x, i, target, noise)
    for k in range(2):
        alone, d = proximal_step(model, op, sampler, pir, x[k : k + 1], int(i[k]), target[k : k + 1], noise[k : k + 1])
        assert torch.allclose(both[k : k + 1], alone, atol=1e-5) and torch.allclose(dist[k], d[0], rtol=1e-5)
    assert all(p.grad is None for p in unet.parameters())
    assert dist.min() > 0


def test_pir_decode_runs_without_unet_backward(models, data):
    unet, codec = models
    dec = idemrt.Decoder(codec, ForwardOnlyUNet(unet), steps=10, guidance="pir", device="cpu")
    out = dec.decode(data, seed=0, output="tensor")
    assert out.shape == (1, 3, H, W) and torch.isfinite(out).all()
    assert dec.last.steps == 10 and dec.last.scales == [None]
    assert all(p.grad is None for p in unet.parameters())


# --- warm start ---------------------------------------------------------------------------------------

def test_start_one_is_todays_decode_bit_for_bit(models, data):
    unet, codec = models
    plain = idemrt.Decoder(codec, unet, steps=10, device="cpu").decode(data, seed=5, output="tensor")
    warm1 = idemrt.Decoder(codec, unet, steps=10, start=1.0, device="cpu").decode(data, seed=5, output="tensor")
    assert torch.equal(plain, warm1)


@pytest.mark.parametrize("start, steps", [(0.4, 10), (0.25, 20), (0.05, 8)])
def test_warm_start_position_and_first_state(start, steps):
    schedule = Schedule.create(1000, steps)
    ws = schedule.warm_start(start)
    t0 = round(start * 1000)
    assert schedule.timestep_map[ws.position] <= t0
    assert ws.position == schedule.num_steps - 1 or schedule.timestep_map[ws.position + 1] > t0
    assert math.isclose(ws.sqrt_abar**2, schedule.alphas_cumprod[ws.position], rel_tol=1e-12)
    assert math.isclose(ws.sqrt_abar**2 + ws.sqrt_one_minus_abar**2, 1.0, rel_tol=1e-12)


def test_warm_start_draws_eps_first_from_the_images_generator(models):
    unet, codec = models
    dec = idemrt.Decoder(codec, unet, steps=10, start=0.5, device="cpu")
    sampler = dec.guided_sampler()
    target = torch.rand(1, 3, H, W) * 2 - 1
    warm = dec.warm_from_target(target)
    state = sampler.start(target, 7, (1, 3, H, W), warm=warm)
    eps = torch.randn((3, H, W), generator=torch.Generator().manual_seed(7))
    ws = dec.warm_start
    assert state.position == ws.position and dec.steps_run == ws.position + 1
    assert torch.allclose(state.x[0], ws.sqrt_abar * warm[0] + ws.sqrt_one_minus_abar * eps)
    with pytest.raises(ValueError, match="warm"):
        sampler.start(target, 7, (1, 3, H, W))


def test_warm_decode_is_the_same_alone_or_in_a_batch(models, data):
    unet, codec = models
    dec = idemrt.Decoder(codec, unet, steps=20, start=0.3, guidance="pir", device="cpu")
    batch = dec.decode_batch([data, data], seeds=[1, 2], output="tensor")
    assert dec.last.steps == dec.warm_start.position + 1 < 20
    for k, seed in enumerate((1, 2)):
        assert torch.allclose(batch[k], dec.decode(data, seed=seed, output="tensor"), atol=1e-5)


def test_warm_start_with_the_y_constraint(models, data):
    unet, codec = models
    dec = idemrt.Decoder(codec, unet, steps=10, start=0.3, constraint="y", device="cpu")
    y_hat = idemrt.api.entropy_decode(codec, idemrt.api.read_bitstream(codec, data))
    assert torch.allclose(dec.warm_from_target(y_hat), (2 * codec.synthesis(y_hat) - 1).clamp(-1, 1))
    assert torch.isfinite(dec.decode(data, seed=0, output="tensor")).all()


@pytest.mark.parametrize("bad", [0, 0.0, -0.5, 1.5, "0.5", True, float("nan")])
def test_bad_start_is_a_value_error(models, bad):
    with pytest.raises(ValueError, match="start"):
        idemrt.Decoder(models[1], models[0], steps=10, start=bad, device="cpu")


# --- speeds -------------------------------------------------------------------------------------------

def test_speed_presets_resolve_and_explicit_arguments_win(models):
    unet, codec = models
    assert resolve_speed(None)["steps"] == 1000 and resolve_speed(None)["guidance"] == "dps"
    fast = idemrt.Decoder(codec, unet, speed="fast", device="cpu")
    assert fast.speed == "fast" and fast.guidance.name == SPEEDS["fast"]["guidance"]
    assert fast.steps_run <= 50
    mine = idemrt.Decoder(codec, unet, speed="fast", guidance="dps", steps=20, device="cpu")
    assert mine.guidance.name == "dps" and mine.schedule.num_steps == 20 and mine.start == SPEEDS["fast"]["start"]
    paper = idemrt.Decoder(codec, unet, device="cpu")
    assert paper.speed == "paper" and paper.schedule.num_steps == 1000 and paper.warm_start is None
    with pytest.raises(ValueError, match="speed"):
        idemrt.Decoder(codec, unet, speed="ludicrous", device="cpu")
    with pytest.raises(ValueError, match="options"):
        idemrt.Decoder(codec, unet, guidance="dps", guidance_options={"iters": 3}, device="cpu")


# --- exact idempotence ----------------------------------------------------------------------------------

def test_exact_refinement_reaches_the_received_symbols(models, data):
    _, codec = models
    y_hat = idemrt.api.entropy_decode(codec, idemrt.api.read_bitstream(codec, data))
    g = torch.Generator().manual_seed(0)
    x = (codec.synthesis(y_hat) + 0.15 * torch.randn(1, 3, 64, 64, generator=g)).clamp(0, 1).detach()
    res = exact_idempotence(codec, x, y_hat, max_steps=200, lr=5e-3)
    assert res.before < 1.0 and res.after == 1.0 == symbols_equal(codec, res.x, y_hat)
    assert 0 < res.steps <= 200 and res.x.min() >= 0 and res.x.max() <= 1


def test_decoder_exact_reports_before_and_after(models, data):
    unet, codec = models
    dec = idemrt.Decoder(codec, unet, steps=10, guidance="pir", start=0.5, exact=True, device="cpu")
    dec.decode(data, seed=0, output="tensor")
    (facts,) = dec.last.exact
    assert set(facts) == {"before", "after", "steps"} and facts["after"] >= facts["before"]


# --- the PIR step on the other backends ---------------------------------------------------------------

def test_fast_backend_float32_runs_the_same_pir_step(models):
    from idemrt.backends.base import StepSpec, create_backend

    unet, codec = models
    x, noise, target, op = _step_inputs(codec)
    spec = StepSpec(unet=unet, operator=op, codec=codec, constraint="x", sampler=DDPMSampler(Schedule.create(1000, 10)),
                    guidance=PIR(iters=2))
    eager = create_backend("eager", spec, device=torch.device("cpu"))
    fast = create_backend("fast", spec, device=torch.device("cpu"), dtype=torch.float32)
    for i in (9, torch.tensor([4, 0])):
        (want, want_d), (got, got_d) = eager.step(x, i, target, noise), fast.step(x, i, target, noise)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5) and torch.allclose(got_d, want_d, rtol=1e-5)


def test_pir_step_graph_on_onnxruntime(tmp_path):
    pytest.importorskip("onnxruntime")
    from test_export_models import SIZE, step_spec, tiny_codec as export_codec, tiny_unet as export_unet

    from idemrt.backends.ort import OnnxRuntimeBackend
    from idemrt.diffusion import proximal_x0
    from idemrt.export import onnx_export as ox
    from idemrt.export.graph_cache import StepGraphs

    unet, codec = export_unet(), export_codec()
    spec = step_spec(unet, codec, "x", guidance=PIR(iters=2))
    graph = StepGraphs(spec, tmp_path).step_gradient(SIZE, SIZE, (3, SIZE, SIZE))
    assert graph.output_names == ox.PROXIMAL_OUTPUTS
    inputs = ox.interior_step_inputs(unet, 2, SIZE, SIZE, (3, SIZE, SIZE), spec.sampler)

    def reference(x_t, t, target, rows):
        return tuple(proximal_x0(unet, spec.operator, spec.sampler, spec.guidance, x_t, t, rows, target))

    ox.validate_with_onnxruntime(graph, reference, inputs, rtol=1e-4)
    backend = OnnxRuntimeBackend(spec, device="cpu", cache_dir=tmp_path)
    g = torch.Generator().manual_seed(0)
    x, noise = torch.randn(2, 3, SIZE, SIZE, generator=g), torch.randn(2, 3, SIZE, SIZE, generator=g)
    target = torch.randn(2, 3, SIZE, SIZE, generator=g) * 0.5
    for i in (9, torch.tensor([5, 0])):
        want, want_d = proximal_step(unet, spec.operator, spec.sampler, spec.guidance, x, i, target, noise)
        got, got_d = backend.step(x, i, target, noise)
        assert ((got - want).abs().max() / want.abs().max()) <= 1e-4
        assert torch.allclose(got_d, want_d, rtol=1e-4)


# --- command line ---------------------------------------------------------------------------------------

def test_decompress_options(tmp_path, monkeypatch, capsys):
    import numpy as np
    from PIL import Image

    from idemrt import cli
    from idemrt.models import unet_loading
    from tiny_models import TINY_UNET, tiny_codec_state, tiny_unet_state

    torch.save(tiny_codec_state(), tmp_path / "codec.pth")
    torch.save(tiny_unet_state(), tmp_path / "unet.pt")
    Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)).save(tmp_path / "in.png")
    real = unet_loading.load_unet
    monkeypatch.setattr(unet_loading, "load_unet", lambda src, preset=None: real(src, **TINY_UNET))
    common = ["--codec-checkpoint", tmp_path / "codec.pth", "--unet", tmp_path / "unet.pt", "--quiet"]
    assert cli.main(["compress", str(tmp_path / "in.png"), str(tmp_path / "a.idm"), "--codec", "bmshj2018-hyperprior",
                     "--quality", "1", "--checkpoint", str(tmp_path / "codec.pth")]) == 0
    args = ["decompress", tmp_path / "a.idm", tmp_path / "p.png", *common, "--speed", "fast", "--steps", "10",
            "--start", "0.5", "--exact"]
    assert cli.main([str(a) for a in args]) == 0
    out = capsys.readouterr().out
    assert "5 steps" in out  # t0 = 500 on a 10-step respacing: positions 0-4
    for bad in (["--start", "0"], ["--start", "1.5"], ["--start", "x"], ["--speed", "warp"]):
        with pytest.raises(SystemExit) as exc:
            cli.main([str(a) for a in ["decompress", tmp_path / "a.idm", tmp_path / "q.png", *common, *bad]])
        assert exc.value.code == 2
