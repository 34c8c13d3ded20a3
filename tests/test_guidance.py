"""DPS / DSG guidance: one step against a float64 reference, per-sample norms, and the effect."""
import copy

import pytest
import torch

import diffusion_reference as ref
from idemrt.diffusion import (
    DDIMSampler,
    DDPMSampler,
    DPS,
    DSG,
    RetryPolicy,
    Schedule,
    distance,
    guided_step,
    plain_step,
    space_timesteps,
)


@pytest.fixture(scope="module")
def nets():
    net = ref.TinyEpsNet(seed=2)
    return net, copy.deepcopy(net).double()


def _batch(n=2, hw=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, hw, hw, generator=g)
    noise = torch.randn(n, 3, hw, hw, generator=g)
    target = ref.toy_operator(torch.rand(n, 3, hw, hw, generator=g) * 2 - 1)
    return x, noise, target


def _assert_close64(got, want):
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


# --- distance ------------------------------------------------------------------------

def test_distance_is_plain_per_sample_l2():
    a = torch.zeros(2, 3, 4, 4)
    b = torch.zeros(2, 3, 4, 4)
    b[0, 0, 0, 0], b[0, 1, 2, 3] = 3.0, 4.0  # sample 0: ||(3, 4)|| = 5
    b[1] = 0.5  # sample 1: sqrt(48 * 0.25)
    torch.testing.assert_close(distance(a, b), torch.tensor([5.0, 48**0.5 / 2]))
    with pytest.raises(ValueError):
        distance(a, b[:1])


# --- one guided step vs float64 ------------------------------------------------------

@pytest.mark.parametrize("i", [99, 40, 0])
def test_dps_ddpm_step_matches_float64_reference(nets, i):
    net, net64 = nets
    respacing = 100
    sampler = DDPMSampler(Schedule.create(1000, respacing))
    x, noise, target = _batch(seed=i)
    x_prev, dist = guided_step(net, ref.toy_operator, sampler, DPS(scale=0.6), x, i, target, noise)
    P = ref.process(1000, sorted(space_timesteps(1000, respacing)))
    want, want_dist = ref.dps(P, ref.ddpm, net64, ref.toy_operator, x.double(), i, target.double(), noise.double(), 0.6)
    _assert_close64(x_prev, want)
    _assert_close64(dist, want_dist)
    assert not x_prev.requires_grad and not dist.requires_grad
    # The guidance moved the sample: the update is not a no-op.
    assert (x_prev - plain_step(net, sampler, x, i, noise)).abs().max() > 1e-3


@pytest.mark.parametrize("i", [199, 77, 1])
def test_dsg_ddim_step_matches_float64_reference(nets, i):
    net, net64 = nets
    respacing = 200
    sampler = DDIMSampler(Schedule.create(1000, respacing))
    x, noise, target = _batch(seed=i)
    x_prev, dist = guided_step(net, ref.toy_operator, sampler, DSG(), x, i, target, noise)
    P = ref.process(1000, sorted(space_timesteps(1000, respacing)))
    want, want_dist = ref.dsg(P, ref.ddim, net64, ref.toy_operator, x.double(), i, target.double(), noise.double())
    _assert_close64(x_prev, want)
    _assert_close64(dist, want_dist)
    assert (x_prev - plain_step(net, sampler, x, i, noise)).abs().max() > 1e-3


@pytest.mark.parametrize("i", [57, 0])
def test_dsg_ddpm_step_matches_float64_reference(nets, i):
    """With DDPM the std is per element: r uses each sample's first element.
    At i == 0 the reference still guides (the learned std is not 0 there)."""
    net, net64 = nets
    sampler = DDPMSampler(Schedule.create(1000, 100))
    x, noise, target = _batch(seed=i)
    x_prev, dist = guided_step(net, ref.toy_operator, sampler, DSG(), x, i, target, noise)
    P = ref.process(1000, sorted(space_timesteps(1000, 100)))
    want, want_dist = ref.dsg(P, ref.ddpm, net64, ref.toy_operator, x.double(), i, target.double(), noise.double())
    _assert_close64(x_prev, want)
    _assert_close64(dist, want_dist)


def test_dsg_stays_on_the_sphere(nets):
    """||x_{t-1} - mean|| = sqrt(C·H·W)·sigma per sample."""
    net, _ = nets
    sampler = DDIMSampler(Schedule.create(1000, 200))
    x, noise, target = _batch()
    i = 150
    x_prev, _ = guided_step(net, ref.toy_operator, sampler, DSG(), x, i, target, noise)
    with torch.no_grad():
        pred = sampler.predict(net(x, sampler.model_timesteps(i, 2)), x, i)
    radius = (x_prev - pred.mean).flatten(1).norm(dim=1)
    torch.testing.assert_close(radius, (3 * 8 * 8) ** 0.5 * pred.sigma[:, 0, 0, 0], rtol=1e-5, atol=0)


def test_dsg_last_step_returns_the_mean(nets):
    net, _ = nets
    sampler = DDIMSampler(Schedule.create(1000, 200))
    x, noise, target = _batch()
    x_prev, dist = guided_step(net, ref.toy_operator, sampler, DSG(), x, 0, target, noise)
    with torch.no_grad():
        pred = sampler.predict(net(x, sampler.model_timesteps(0, 2)), x, 0)
    torch.testing.assert_close(x_prev, pred.mean, rtol=0, atol=0)  # r = 0: no guidance, no noise
    torch.testing.assert_close(dist, distance(target, ref.toy_operator(pred.x0)))


def test_dsg_off_interval(nets):
    net, net64 = nets
    sampler = DDIMSampler(Schedule.create(1000, 200))
    x, noise, target = _batch()
    guidance = DSG(interval=2)
    x_prev, dist = guided_step(net, ref.toy_operator, sampler, guidance, x, 151, target, noise)
    torch.testing.assert_close(x_prev, plain_step(net, sampler, x, 151, noise), rtol=0, atol=0)
    assert dist.shape == (2,) and (dist == 0).all()
    P = ref.process(1000, sorted(space_timesteps(1000, 200)))
    for i in (151, 150):  # off and on the interval
        got, _ = guided_step(net, ref.toy_operator, sampler, guidance, x, i, target, noise)
        want, _ = ref.dsg(P, ref.ddim, net64, ref.toy_operator, x.double(), i, target.double(), noise.double(), 2)
        _assert_close64(got, want)
    # The update itself, with a tensor index (graph capture), selects without a branch.
    with torch.no_grad():
        pred = sampler.predict(net(x, sampler.model_timesteps(151, 2)), x, 151)
    sample = sampler.step(pred, noise, 151)
    grad = torch.randn_like(x)
    assert torch.equal(guidance.update(sample, pred, grad, 151), sample)
    assert torch.equal(guidance.update(sample, pred, grad, torch.tensor(151)), sample)
    torch.testing.assert_close(guidance.update(sample, pred, grad, torch.tensor(150)), guidance.update(sample, pred, grad, 150))


def test_dps_update_is_sample_minus_scaled_grad():
    sample, grad = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(DPS(scale=0.6).update(sample, None, grad, 5), sample - 0.6 * grad)


# --- per-sample norms ----------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda: (DDPMSampler(Schedule.create(1000, 100)), DPS(0.6), 60),
    lambda: (DDIMSampler(Schedule.create(1000, 200)), DSG(), 120),
])
def test_batch_of_two_equals_each_alone(nets, make):
    net, net64 = nets
    sampler, guidance, i = make()
    x, noise, target = _batch()
    x_prev, dist = guided_step(net, ref.toy_operator, sampler, guidance, x, i, target, noise)
    for k in range(2):
        alone, alone_dist = guided_step(net, ref.toy_operator, sampler, guidance,
                                        x[k:k + 1], i, target[k:k + 1], noise[k:k + 1])
        torch.testing.assert_close(x_prev[k:k + 1], alone, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dist[k:k + 1], alone_dist, rtol=1e-5, atol=1e-6)
    # The reference's whole-batch norm would couple the two samples; it gives a different result.
    if isinstance(guidance, DPS):
        P = ref.process(1000, sorted(space_timesteps(1000, 100)))
        xd = x.double().requires_grad_(True)
        x0, _, _, sample = ref.ddpm(P, net64, xd, i, noise.double())
        joint = torch.linalg.norm(target.double() - ref.toy_operator(x0))
        coupled = sample - 0.6 * torch.autograd.grad(joint, xd)[0]
        assert (coupled - x_prev.double()).abs().max() > 1e-3


# --- per-sample step indices and scales ------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda: (DDPMSampler(Schedule.create(1000, 100)), DPS(0.6)),
    lambda: (DDIMSampler(Schedule.create(1000, 100)), DSG(interval=2)),
    lambda: (DDIMSampler(Schedule.create(1000, 100)), DPS(0.9)),
])
def test_images_at_different_steps_equal_each_stepped_alone(nets, make):
    """A batch whose images sit at different steps (and, for DPS, have different scales) equals
    each image stepped alone with an int index (eager fp32, within 1e-6). DSG's interval is
    decided per sample: the odd steps here are off-interval (distance 0, no guidance)."""
    net, _ = nets
    sampler, guidance = make()
    steps, scales = [99, 60, 0, 33], [0.6, 0.9, 1.35, 0.3]
    x, noise, target = _batch(n=4, seed=7)
    x_prev, dist = guided_step(net, ref.toy_operator, sampler, guidance, x, torch.tensor(steps), target, noise,
                               torch.tensor(scales))
    for k, i in enumerate(steps):
        g = DPS(scales[k]) if isinstance(guidance, DPS) else guidance
        alone, alone_dist = guided_step(net, ref.toy_operator, sampler, g, x[k:k + 1], i, target[k:k + 1],
                                        noise[k:k + 1])
        torch.testing.assert_close(x_prev[k:k + 1], alone, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(dist[k:k + 1], alone_dist, rtol=1e-6, atol=1e-6)
    if isinstance(guidance, DSG):
        assert dist[0] == 0 and dist[3] == 0 and dist[1] > 0  # 99 and 33 are off-interval
    else:  # the scale is per-sample data: a wrong one would be caught
        swapped, _ = guided_step(net, ref.toy_operator, sampler, guidance, x, torch.tensor(steps), target, noise,
                                 torch.tensor(scales[::-1]))
        assert (swapped - x_prev).abs().max() > 1e-4


def test_dsg_per_sample_interval_with_every_sample_off_runs_no_gradient(nets):
    net, _ = nets
    sampler = DDIMSampler(Schedule.create(1000, 100))
    x, noise, target = _batch(n=2)
    i = torch.tensor([51, 33])  # both off DSG(interval=2)

    def no_operator(x0):
        raise AssertionError("the operator must not run when no sample is guided")

    x_prev, dist = guided_step(net, no_operator, sampler, DSG(interval=2), x, i, target, noise)
    torch.testing.assert_close(x_prev, plain_step(net, sampler, x, i, noise), rtol=0, atol=0)
    assert (dist == 0).all()


# --- effect ---------------------------------------------------------------------------

def _run(sampler, guidance, n=2, hw=16):
    """A full guided (or unguided) loop with the recommended draw order."""
    net = ref.GaussianPriorNet(std=0.5)
    g = torch.Generator().manual_seed(123)
    x_ref = torch.nn.functional.interpolate(torch.rand(n, 3, hw // 4, hw // 4, generator=g) * 2 - 1, scale_factor=4,
                                            mode="bilinear", align_corners=False)
    target = ref.toy_operator(x_ref)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, hw, hw, generator=g)
    for i in reversed(range(sampler.num_steps)):
        noise = torch.randn(x.shape, generator=g)
        if guidance is None:
            x = plain_step(net, sampler, x, i, noise)
        else:
            x, _ = guided_step(net, ref.toy_operator, sampler, guidance, x, i, target, noise)
    return distance(target, ref.toy_operator(x))


@pytest.mark.parametrize("make_sampler, guidance", [
    (lambda: DDPMSampler(Schedule.create(1000, 200)), DPS(scale=0.6)),
    (lambda: DDIMSampler(Schedule.create(1000, 200)), DSG()),
])
def test_guidance_pulls_samples_onto_the_constraint(make_sampler, guidance):
    """Same seeds (x_T and every step's noise) with and without guidance; the
    shipped constants (DPS scale 0.6, DSG rate 0.1), 200 respaced steps, and a
    diffusion model of a known Gaussian prior whose unguided samples ignore y."""
    sampler = make_sampler()
    unguided = _run(sampler, None)
    guided = _run(sampler, guidance)
    print(f"{type(guidance).__name__}: final ||y - A(x)|| unguided {unguided.tolist()} guided {guided.tolist()}")
    assert (guided < 0.5 * unguided).all()


# --- retry rule -----------------------------------------------------------------------

def test_retry_policy():
    d = torch.tensor([5.0, 25.0, float("nan")])
    assert not RetryPolicy().needs_retry(d, 0).any()  # max_retries 0: the shipped configs never retry
    policy = RetryPolicy(threshold=20.0, factor=1.5, max_retries=2)
    assert policy.needs_retry(d, 0).tolist() == [False, True, True]
    assert policy.needs_retry(d, 1).tolist() == [False, True, True]
    assert not policy.needs_retry(d, 2).any()
    assert policy.needs_retry(d, torch.tensor([0, 2, 1])).tolist() == [False, False, True]  # per image
    assert policy.next_scale(0.6) == pytest.approx(0.9)


@pytest.mark.parametrize("build", [
    lambda: DPS(scale=-1.0), lambda: DPS(scale=float("inf")), lambda: DSG(interval=0), lambda: DSG(interval=1.5),
    lambda: DSG(guidance_rate=float("nan")), lambda: RetryPolicy(max_retries=-1), lambda: RetryPolicy(factor=float("nan")),
    lambda: RetryPolicy(nan_retries=-1), lambda: RetryPolicy(nan_factor=float("inf")),
])
def test_bad_guidance_parameters(build):
    with pytest.raises(ValueError):
        build()


# --- graph capture (GPU only) ---------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_predict_step_update_capture_in_a_cuda_graph():
    """With a device-tensor step index, predict -> step -> update run without a
    host sync and replay from one CUDA graph for any step."""
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    x, noise, grad = (torch.randn(2, 3, 8, 8, device=dev, generator=g) for _ in range(3))
    out = torch.randn(2, 6, 8, 8, device=dev, generator=g)
    for sampler, guidance in ((DDIMSampler(Schedule.create(1000, 20)).to(dev), DSG(interval=2)),
                              (DDPMSampler(Schedule.create(1000, 20)).to(dev), DPS(0.6))):
        i = torch.tensor(19, device=dev)

        def run():
            pred = sampler.predict(out, x, i)
            return guidance.update(sampler.step(pred, noise, i), pred, grad, i), sampler.model_timesteps(i, 2)

        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_x, static_t = run()
        for step in (19, 8, 7, 0):
            i.fill_(step)
            graph.replay()
            pred = sampler.predict(out, x, step)
            want = guidance.update(sampler.step(pred, noise, step), pred, grad, step)
            torch.testing.assert_close(static_x, want, rtol=0, atol=0)
            assert static_t.tolist() == [int(sampler.schedule.timestep_map[step])] * 2
