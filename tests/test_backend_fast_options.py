"""The fast backend's levers (issue 30), each an option tested on the CPU against eager:

* ``triton_passes``: per kernel family, Triton forward and backward, Triton forward with
  PyTorch's backward, or PyTorch's — wired as asked (call counters) and equal to eager in float32;
* ``cudnn_benchmark``: the flag the captured and uncaptured steps run under;
* ``compile`` / ``compile_mode``: which torch.compile is applied (a recording stand-in here; the
  real compile of the blocks is in tests/test_compile_cache.py, slow);
* ``operator_channels_last``: the operator on a channels_last codec copy;
* the ELIC operator in bf16/fp16 (A and its VJP against fp32), and ELIC under kernels="triton".

fp16 and bf16 of the UNet and the hyperprior operator: tests/test_backend_fast.py (LOW).
"""
import pytest
import torch
from compressai.models.sensetime import Elic2022Chandelier

import idemrt.backends.fast as fast_module
from idemrt.backends.base import StepSpec, create_backend
from idemrt.backends.cuda_graphs import cudnn_autotune
from idemrt.backends.fast import PASSES, TRITON_KERNELS, FastBackend, default_triton_passes
from idemrt.errors import BackendError
from idemrt.models.codec import Codec, diffusion_operator
from idemrt.models.unet import AttentionBlock, ResBlock
from test_backend_fast import codec, inputs, make_spec, rel_err, unet  # noqa: F401 - fixtures

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def elic():
    """A small ELIC (compressai's Elic2022Chandelier, five channel groups) whose latents reach
    several units, so that rounding and the checkerboard context matter."""
    torch.manual_seed(1)
    model = Elic2022Chandelier(N=8, M=16, groups=[2, 2, 4, 4, 4])
    with torch.no_grad():
        [m for m in model.g_a if isinstance(m, torch.nn.Conv2d)][-1].weight.mul_(20)
        model.latent_codec["hyper"].h_a[-1].weight.mul_(5)
    model.update(force=True)
    return Codec("elic2022-chandelier", model.eval())


def _counting(monkeypatch, module, name, calls):
    fn = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append((name, kwargs.get("backward")))
        return fn(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)


def _reference_norm_act(x, weight, bias, scale=None, shift=None, backward="triton"):
    """The GroupNorm kernel's torch reference with its signature: the interpreted kernel takes
    seconds per call, and its backward="torch" path is tested in test_kernels_torch_backward.py."""
    from idemrt.kernels.groupnorm_silu import groupnorm_silu_reference

    return groupnorm_silu_reference(x, weight, bias, scale, shift)


# --- triton_passes ------------------------------------------------------------------------------

@pytest.mark.parametrize("family", TRITON_KERNELS)
@pytest.mark.parametrize("chosen", ["fwd", "none"])
def test_triton_passes_are_wired_and_equal_eager(unet, codec, monkeypatch, family, chosen):
    import idemrt.kernels.gdn as gdn_module
    import idemrt.kernels.groupnorm_silu as gn_module
    import idemrt.kernels.loss_seed as ls_module
    import idemrt.kernels.sampler_update as su_module

    calls = []
    monkeypatch.setattr(gn_module, "groupnorm_silu", _reference_norm_act)
    _counting(monkeypatch, gn_module, "groupnorm_silu", calls)
    _counting(monkeypatch, gdn_module, "gdn", calls)
    _counting(monkeypatch, su_module, "sampler_update", calls)
    _counting(monkeypatch, su_module, "predict_x0", calls)
    _counting(monkeypatch, ls_module, "residual_norm", calls)

    spec = make_spec(unet, codec)
    spec.operator = diffusion_operator(codec, "x")
    eager = create_backend("eager", spec, device=CPU)
    fast = create_backend("fast", spec, device=CPU, dtype=torch.float32, kernels="triton",
                          triton_passes={family: chosen})
    assert fast.triton_passes == {**default_triton_passes(CPU), family: chosen}
    x, noise, _ = inputs(codec)
    with torch.no_grad():
        target = spec.operator(torch.rand(x.shape, generator=torch.Generator().manual_seed(9)) * 2 - 1)
    want_x, want_d = eager.step(x, 9, target, noise)
    got_x, got_d = fast.step(x, 9, target, noise)
    assert rel_err(got_x, want_x) <= 1e-5 and rel_err(got_d, want_d) <= 1e-5

    names = {name for name, _ in calls}
    backwards = {name: {b for n, b in calls if n == name} for name in names}
    # the families not chosen run as by default (Triton forward and backward)
    if family != "groupnorm_silu":
        assert backwards["groupnorm_silu"] == {"triton"}
    if family != "gdn":
        assert backwards["gdn"] == {"triton"}
    if family != "step":
        assert {"predict_x0", "residual_norm", "sampler_update"} <= names
    if family == "groupnorm_silu":
        assert backwards.get("groupnorm_silu") == ({"torch"} if chosen == "fwd" else None)
    elif family == "gdn":
        assert backwards.get("gdn") == ({"torch"} if chosen == "fwd" else None)
    else:  # "fwd": PyTorch's x0, distance and gradient, the update kernel; "none": PyTorch's only
        assert not {"predict_x0", "residual_norm"} & names
        assert ("sampler_update" in names) == (chosen == "fwd")


def test_bad_triton_passes(unet, codec):
    spec = make_spec(unet, codec)
    with pytest.raises(BackendError, match="unknown kernel family"):
        FastBackend(spec, device=CPU, dtype=torch.float32, kernels="triton", triton_passes={"attention": "fwd"})
    with pytest.raises(BackendError, match=r"must be one of \('fwd\+bwd', 'fwd', 'none'\)"):
        FastBackend(spec, device=CPU, dtype=torch.float32, kernels="triton", triton_passes={"gdn": "bwd"})
    with pytest.raises(BackendError, match="needs kernels='triton'"):
        FastBackend(spec, device=CPU, dtype=torch.float32, triton_passes={"gdn": "fwd"})
    assert PASSES == ("fwd+bwd", "fwd", "none")


def test_options_reach_the_backend_through_the_decode_config(unet, codec):
    """DecodeConfig.backend_options is how a Decoder (and the service) passes these levers."""
    from idemrt.api import Decoder
    from idemrt.decode_config import DecodeConfig

    config = DecodeConfig(steps=STEPS_FOR_CONFIG, backend="fast", dtype="fp16",
                          backend_options={"cudnn_benchmark": False, "compile": None})
    decoder = Decoder(codec, unet, config=config, device="cpu")
    assert decoder.backend.cudnn_benchmark is False and decoder.backend.dtype == torch.float16
    with pytest.raises(BackendError, match="does not take these options"):
        Decoder(codec, unet, config=config.replace(backend_options={"kernel": "triton"}), device="cpu").backend


STEPS_FOR_CONFIG = 10


# --- cudnn.benchmark ----------------------------------------------------------------------------

@pytest.mark.parametrize("enabled", [True, False])
def test_cudnn_autotune_sets_the_flag_on_cuda_and_restores_it(enabled):
    """The flag is process state (no GPU needed to set it); off CUDA the context changes nothing."""
    before = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = not enabled
        with cudnn_autotune(torch.device("cuda", 0), enabled):
            assert torch.backends.cudnn.benchmark is enabled
        assert torch.backends.cudnn.benchmark is (not enabled)
        with cudnn_autotune(CPU, enabled):
            assert torch.backends.cudnn.benchmark is (not enabled)
    finally:
        torch.backends.cudnn.benchmark = before


@pytest.mark.parametrize("enabled", [True, False])
def test_cudnn_benchmark_option_is_what_the_step_runs_under(unet, codec, monkeypatch, enabled):
    seen = []

    def recording(device, flag=True):
        seen.append(flag)
        return cudnn_autotune(device, flag)

    monkeypatch.setattr(fast_module, "cudnn_autotune", recording)
    fast = FastBackend(make_spec(unet, codec), device=CPU, dtype=torch.float32, cudnn_benchmark=enabled)
    x, noise, target = inputs(codec)
    fast.step(x, 3, target, noise)
    fast.step_uncaptured(x, 3, target, noise)
    fast._graphs.settings().__enter__()  # what warm-up and capture run under
    assert seen == [enabled] * 3


# --- torch.compile ------------------------------------------------------------------------------

def _fake_compile(seen):
    def fake(fn, **kwargs):
        seen.append((fn, kwargs))
        return fn
    return fake


@pytest.mark.parametrize("scope, mode", [("unet", None), ("unet", "max-autotune-no-cudagraphs"),
                                         ("blocks", None), ("blocks", "max-autotune-no-cudagraphs")])
def test_compile_options_compile_what_they_say(unet, codec, monkeypatch, tmp_path, scope, mode):
    """compile="unet" hands the copy to torch.compile, "blocks" each ResBlock and AttentionBlock
    (here a recording stand-in: inductor on this CPU takes minutes), with the chosen mode."""
    seen = []
    monkeypatch.setattr(torch, "compile", _fake_compile(seen))
    spec = make_spec(unet, codec)
    fast = FastBackend(spec, device=CPU, dtype=torch.float32, compile=scope, compile_mode=mode,
                       compile_cache=tmp_path)
    want_mode = mode or "default"  # off CUDA the default mode is "default"
    assert fast.compile == scope and fast.compile_mode == want_mode
    assert all(kw == dict(mode=want_mode, fullgraph=True, dynamic=False) for _, kw in seen)
    blocks = [m for m in fast.unet.modules() if isinstance(m, (ResBlock, AttentionBlock))]
    if scope == "unet":
        assert [fn for fn, _ in seen] == [fast.unet]
    else:
        assert len(seen) == len(blocks) and all(fn == m._call_impl for (fn, _), m in zip(seen, blocks))
        # another backend of the same options shares the copy, compiled once
        again = FastBackend(spec, device=CPU, dtype=torch.float32, compile=scope, compile_mode=mode,
                            compile_cache=False)
        assert again.unet is fast.unet and len(seen) == len(blocks)
    x, noise, target = inputs(codec)
    want_x, _ = create_backend("eager", spec, device=CPU).step(x, 4, target, noise)
    assert rel_err(fast.step(x, 4, target, noise)[0], want_x) <= 1e-5
    # a compiled copy is not the plain one; kernels="compile" is compile="unet"
    assert fast.unet is not FastBackend(spec, device=CPU, dtype=torch.float32).unet
    alias = FastBackend(spec, device=CPU, dtype=torch.float32, kernels="compile", compile_cache=False)
    assert (alias.kernels, alias.compile) == ("torch", "unet")


def test_operator_channels_last(unet, codec):
    """The CPU default runs A on a private channels_last codec copy (the same A, other kernels);
    False runs the shared codec; a spec whose codec is not an idemrt Codec cannot be copied."""
    spec = make_spec(unet, codec)
    on = FastBackend(spec, device=CPU, dtype=torch.float32)
    off = FastBackend(spec, device=CPU, dtype=torch.float32, operator_channels_last=False)
    assert on.operator_channels_last and on.operator is not spec.operator
    assert not off.operator_channels_last and off.operator is spec.operator
    x0 = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    assert rel_err(on.apply_operator(x0), off.apply_operator(x0)) <= 1e-5
    foreign = StepSpec(unet=unet, operator=spec.operator, codec=None, constraint="x", sampler=spec.sampler,
                       guidance=spec.guidance)
    assert FastBackend(foreign, device=CPU, dtype=torch.float32).operator is spec.operator  # default: off
    with pytest.raises(BackendError, match="idemrt Codec"):
        FastBackend(foreign, device=CPU, dtype=torch.float32, operator_channels_last=True)


def test_bad_compile_options(unet, codec):
    spec = make_spec(unet, codec)
    with pytest.raises(BackendError, match="compile must be None or one of"):
        FastBackend(spec, device=CPU, dtype=torch.float32, compile="step")
    with pytest.raises(BackendError, match="compile needs kernels='torch'"):
        FastBackend(spec, device=CPU, dtype=torch.float32, kernels="triton", compile="blocks")
    with pytest.raises(BackendError, match="compile_mode without compile"):
        FastBackend(spec, device=CPU, dtype=torch.float32, compile_mode="default")


# --- ELIC on the fast path ----------------------------------------------------------------------

ELIC_SIZE = 64  # ELIC's hyperprior needs y of at least 4x4: 64x64 images


# Measured on three random tiny ELICs (seeds 1-3): A 0.9 % (bf16) / 0.05-0.25 % (fp16); the VJP
# 6.5-9.1 % (bf16) / 1.5-4.2 % (fp16) — 3-5x the hyperprior's (tests/test_backend_fast.py): g_s is
# deeper (residual bottlenecks, attention), and latents whose rounding flips in low precision
# change the point g_s is differentiated at. Hence operator_dtype=float32 is a variant worth timing.
@pytest.mark.parametrize("dtype, vjp_tol", [(torch.bfloat16, 1e-1), (torch.float16, 5e-2)])
def test_elic_operator_in_low_precision(unet, elic, dtype, vjp_tol):
    """A(x0) and its VJP under the backend's autocast against fp32."""
    spec = StepSpec(unet=unet, operator=diffusion_operator(elic, "x"), codec=elic, constraint="x",
                    sampler=make_spec(unet, elic).sampler, guidance=make_spec(unet, elic).guidance)
    backend = FastBackend(spec, device=CPU, dtype=dtype)
    gen = torch.Generator().manual_seed(4)
    x0 = torch.rand(2, 3, ELIC_SIZE, ELIC_SIZE, generator=gen) * 2 - 1
    cotangent = torch.randn(2, 3, ELIC_SIZE, ELIC_SIZE, generator=gen)
    a32 = x0.clone().requires_grad_(True)
    want_a = spec.operator(a32)
    (want,) = torch.autograd.grad(want_a, a32, cotangent)
    al = x0.clone().requires_grad_(True)
    got_a = backend.apply_operator(al)
    (got,) = torch.autograd.grad(got_a, al, cotangent)
    assert got_a.dtype == torch.float32
    assert rel_err(got_a, want_a) <= 2e-2
    assert rel_err(got, want) <= vjp_tol
    # operator_dtype=float32 computes the fp32 operator, whatever the UNet's dtype: exactly on the
    # shared codec, to rounding on the channels_last copy (other convolution kernels)
    shared = FastBackend(spec, device=CPU, dtype=dtype, operator_dtype=torch.float32, operator_channels_last=False)
    assert torch.equal(shared.apply_operator(x0), want_a.detach())
    copied = FastBackend(spec, device=CPU, dtype=dtype, operator_dtype=torch.float32)
    assert copied.operator_channels_last  # the CPU default
    assert rel_err(copied.apply_operator(x0), want_a) <= 1e-5


def test_elic_under_triton_kernels_equals_eager(unet, elic, monkeypatch):
    """ELIC has no GDN layers: kernels="triton" keeps its operator's layers and still fuses the
    step; in float32 the step equals eager's at 64x64."""
    import idemrt.kernels.groupnorm_silu as gn_module

    monkeypatch.setattr(gn_module, "groupnorm_silu", _reference_norm_act)
    spec = make_spec(unet, elic)
    spec.operator = diffusion_operator(elic, "x")
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, 3, ELIC_SIZE, ELIC_SIZE, generator=gen)
    noise = torch.randn(x.shape, generator=gen)
    with torch.no_grad():
        target = spec.operator(torch.rand(x.shape, generator=gen) * 2 - 1)
    want_x, want_d = create_backend("eager", spec, device=CPU).step(x, 5, target, noise)
    got_x, got_d = FastBackend(spec, device=CPU, dtype=torch.float32, kernels="triton").step(x, 5, target, noise)
    assert want_d.min() > 0
    assert rel_err(got_x, want_x) <= 1e-5 and rel_err(got_d, want_d) <= 1e-5


# --- GPU (-m gpu; what a lease checks before gpu_variants.py times the same options) -------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def exact_fp32():
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("options", [
    {"kernels": "triton", "triton_passes": {"groupnorm_silu": "fwd", "gdn": "fwd", "step": "fwd"}},
    {"kernels": "triton", "triton_passes": {"groupnorm_silu": "none", "gdn": "none", "step": "none"}},
    {"kernels": "torch", "operator_channels_last": True},
    {"kernels": "torch", "cudnn_benchmark": False},
    pytest.param({"kernels": "torch", "compile": "blocks"}, marks=pytest.mark.slow),
], ids=["triton-fwd", "triton-none", "operator-channels-last", "no-cudnn-benchmark", "compile-blocks"])
def test_gpu_options_replay_the_plain_step(unet, codec, exact_fp32, tmp_path, options):
    """In float32 (TF32 off) each option's captured step equals the plain fast backend's, and one
    graph serves every step."""
    import copy as copy_module

    dev = torch.device("cuda")
    spec = make_spec(copy_module.deepcopy(unet).to(dev), copy_module.deepcopy(codec).to(dev))
    spec.sampler = spec.sampler.to(dev)
    x, noise, target = (t.to(dev) for t in inputs(codec))
    plain = FastBackend(spec, device=dev, dtype=torch.float32, kernels="torch")
    other = FastBackend(spec, device=dev, dtype=torch.float32, compile_cache=tmp_path, **options)
    for i in (9, 0):
        want_x, want_d = plain.step(x, i, target, noise)
        got_x, got_d = other.step(x, i, target, noise)
        assert rel_err(got_x, want_x) <= 1e-4 and rel_err(got_d, want_d) <= 1e-4
    assert other.num_graphs == 1
