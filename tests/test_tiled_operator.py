"""The codec operator in tiles with halos (idemrt.diffusion.tiled_operator) against the whole image."""
import weakref

import pytest
import torch

from idemrt.diffusion.tiled_operator import OPERATOR_HALO, TiledOperator, tiled_operator
from idemrt.diffusion.tiling import Tiling
from idemrt.models.codec import diffusion_operator
from tiny_models import tiny_codec

# Not multiples of the tile (128) on either axis; multiples of the pad multiple (64), as a decode's are.
H, W = 320, 448
TILE = 128


@pytest.fixture(scope="module")
def codec64():
    codec = tiny_codec()
    codec.model.double()
    return codec


def _pre_round(codec):
    """g_s(g_a(x)): the operator without its round, a smooth function to compare tiles on."""
    return lambda x: codec.synthesis(codec.analysis(x))


def test_receptive_field_is_within_the_halo(codec64):
    # Perturb one pixel at each of the 16 phases of g_a's stride (on the diagonal: both axes' phases)
    # and see how far the output moves: the operator's receptive-field radius. Without the round (a
    # pointwise step cannot widen it) and with random weights, every tap is nonzero.
    f = _pre_round(codec64)
    x = torch.rand(1, 3, 256, 256, dtype=torch.float64)
    xs = x.repeat(16, 1, 1, 1)
    for k in range(16):
        xs[k, :, 128 + k, 128 + k] += 0.5
    moved = (f(xs) - f(x)).abs().amax(1) > 0
    radius = 0
    for k in range(16):
        ys, xw = torch.nonzero(moved[k], as_tuple=True)
        radius = max(radius, int((ys - 128 - k).abs().max()), int((xw - 128 - k).abs().max()))
    # 2·(2 + 4 + 8 + 16) = 60 px: four 5×5 stride-2 convs in g_a, four transposed ones in g_s.
    assert radius == 60
    assert radius <= OPERATOR_HALO[codec64.name]


@pytest.mark.parametrize("constraint", ["x", "y"])
def test_tiled_equals_whole_float64(codec64, constraint):
    x0 = torch.rand(2, 3, H, W, dtype=torch.float64) * 2 - 1
    whole_op = diffusion_operator(codec64, constraint)
    tiled = tiled_operator(whole_op, codec64, TILE)
    assert isinstance(tiled, TiledOperator) and len(tiled.regions(H, W)) == 3 * 4
    # The smooth part (pre-round) to float64 summation-order error.
    pre = TiledOperator(_pre_round(codec64), TILE, OPERATOR_HALO[codec64.name], codec64.pad_multiple)
    ref = _pre_round(codec64)((x0 + 1) / 2)
    assert torch.allclose(pre((x0 + 1) / 2), ref, rtol=0, atol=1e-10)
    # The operator itself: in float64 no latent lies within ~1e-13 of a .5 boundary, so no round flips.
    out, want = tiled(x0), whole_op(x0)
    assert out.shape == want.shape
    assert torch.allclose(out, want, rtol=0, atol=1e-10)
    if constraint == "x":  # the check can fail: without halos the cuts inside the image show
        assert not torch.allclose(TiledOperator(whole_op, TILE, 0, 64)(x0), want, rtol=0, atol=1e-3)
    # VJP: the tiles' gradients summed equal the whole image's.
    g = torch.randn_like(want)
    xt = x0.clone().requires_grad_(True)
    xw = x0.clone().requires_grad_(True)
    (gt,) = torch.autograd.grad(tiled(xt), xt, g)
    (gw,) = torch.autograd.grad(whole_op(xw), xw, g)
    assert torch.allclose(gt, gw, rtol=0, atol=1e-10 * gw.abs().max().item())


def test_tiled_equals_whole_demo_codec_float32():
    from idemrt.demo_assets import load_demo_codec

    codec = load_demo_codec()
    torch.manual_seed(0)
    x0 = torch.rand(1, 3, H, W) * 2 - 1
    whole_op = diffusion_operator(codec, "x")
    tiled = tiled_operator(whole_op, codec, TILE)
    pre = TiledOperator(_pre_round(codec), TILE, OPERATOR_HALO[codec.name], codec.pad_multiple)
    with torch.no_grad():
        assert torch.allclose(pre((x0 + 1) / 2), _pre_round(codec)((x0 + 1) / 2), rtol=0, atol=1e-4)
        y_tiled = TiledOperator(lambda x: codec.analysis(x), TILE, 64, 64)((x0 + 1) / 2)
        y_whole = codec.analysis((x0 + 1) / 2)
    # In float32 a latent within summation-order error of a .5 boundary may round the other way in a
    # tile; such flips must be rare, and where none happens the outputs agree. Measured here: tiles'
    # latents differ from the whole image's by <= 5e-7, the nearest latent to a boundary is 2e-5 from
    # it, so no flip (and the VJPs agree to 4e-7 relative).
    flips = (torch.round(y_tiled) != torch.round(y_whole)).float().mean().item()
    assert flips < 1e-3
    out, want = tiled(x0), whole_op(x0)
    changed = ((out - want).abs() > 1e-3).float().mean().item()
    assert changed <= 100 * flips + 1e-6  # only pixels near a flipped latent (it reaches ~60 px)
    g = torch.randn_like(want)
    xt, xw = x0.clone().requires_grad_(True), x0.clone().requires_grad_(True)
    (gt,) = torch.autograd.grad(tiled(xt), xt, g)
    (gw,) = torch.autograd.grad(whole_op(xw), xw, g)
    assert ((gt - gw).norm() / gw.norm()).item() < 1e-4


def test_small_images_run_the_whole_image_operator_bit_for_bit(codec64):
    whole_op = diffusion_operator(codec64, "x")
    tiled = tiled_operator(whole_op, codec64, Tiling().operator_tile)
    x0 = torch.rand(1, 3, 512, 384, dtype=torch.float64) * 2 - 1
    assert not tiled.tiles(512, 384)
    assert torch.equal(tiled(x0), whole_op(x0))
    assert tiled_operator(whole_op, codec64, None) is whole_op


def test_unmeasured_codecs_keep_the_whole_image_operator():
    codec = tiny_codec()
    op = diffusion_operator(codec, "x")
    assert isinstance(tiled_operator(op, codec, 128), TiledOperator)
    codec.name = "elic2022-official"  # its rounding reads the hyper branch: receptive field not measured
    assert tiled_operator(op, codec, 128) is op


def test_bad_tiles_are_refused():
    with pytest.raises(ValueError):
        Tiling(operator_tile=100)
    with pytest.raises(ValueError):
        TiledOperator(lambda x: x, 96, 64, 64)
    assert Tiling.from_value(Tiling(operator_tile=None).to_dict()) == Tiling(operator_tile=None)


def _peak_saved(fn):
    """Largest total size (elements) of autograd's saved tensors alive at once during ``fn()``."""
    live, peak = [0], [0]

    class Held:
        def __init__(self, t):
            self.t = t

    def pack(t):
        held = Held(t)
        live[0] += t.numel()
        peak[0] = max(peak[0], live[0])
        weakref.finalize(held, lambda n=t.numel(): live.__setitem__(0, live[0] - n))
        return held

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda held: held.t):
        fn()
    return peak[0]


def test_held_autograd_memory_is_one_tiles(codec64):
    codec = tiny_codec()  # float32: the memory a decode holds
    op = diffusion_operator(codec, "x")

    def grad_of(operator, h, w):
        x = (torch.rand(1, 3, h, w) * 2 - 1).requires_grad_(True)
        return lambda: torch.autograd.grad(operator(x), x, torch.ones(1, 3, h, w))

    one_tile = _peak_saved(grad_of(op, TILE + 2 * 64, TILE + 2 * 64))  # a tile with its halos, whole
    tiled = _peak_saved(grad_of(tiled_operator(op, codec, TILE), 512, 640))
    whole = _peak_saved(grad_of(op, 512, 640))
    assert tiled <= one_tile + 3 * 512 * 640  # one tile's graph and the saved input x
    # The check can fail: the whole image has 5x the pixels of a tile with its halos (measured:
    # whole 11.3M elements, tiled 3.26M = one tile's 2.28M + x's 0.98M).
    assert whole > 4 * one_tile and whole > 3 * tiled


def test_eager_backend_tiles_the_operator_of_a_tiled_decode():
    from idemrt.backends.base import StepSpec, create_backend
    from idemrt.diffusion import DDPMSampler, DPS, Schedule
    from idemrt.diffusion.step import guided_step
    from idemrt.diffusion.tiling import TiledModel
    from tiny_models import tiny_unet

    codec, unet = tiny_codec(), tiny_unet().eval()
    op = diffusion_operator(codec, "x")
    sampler = DDPMSampler(Schedule.create(1000, 10))
    spec = StepSpec(unet=unet, operator=op, codec=codec, constraint="x", sampler=sampler, guidance=DPS(0.6),
                    tile=Tiling(window=32, stride=24, chunk=4, operator_tile=64))
    backend = create_backend("eager", spec, device=torch.device("cpu"))
    assert isinstance(backend.operator, TiledOperator)
    g = torch.Generator().manual_seed(6)
    x, noise = torch.randn(1, 3, 128, 192, generator=g), torch.randn(1, 3, 128, 192, generator=g)
    with torch.no_grad():
        target = op(torch.rand(1, 3, 128, 192, generator=g) * 2 - 1)
    got = backend.step(x, 7, target, noise)
    model = TiledModel(unet, 32, 24, chunk=4)
    want = guided_step(model, TiledOperator(op, 64, 64, 64), sampler, spec.guidance, x, 7, target, noise)
    assert torch.equal(got[0], want[0])
    # and the step with the whole-image operator, up to float32 summation order (the tiny codec's
    # latents sit far from .5 boundaries here: no flips)
    whole = guided_step(model, op, sampler, spec.guidance, x, 7, target, noise)
    torch.testing.assert_close(got[0], whole[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("operator_dtype", [torch.float32, torch.bfloat16])
def test_fast_backend_tiles_the_operator_like_eager(operator_dtype):
    """The fast backend wraps its operator (its autocast copy) the same way: a bf16 operator's tiled
    step stays near its whole-image one, a float32 one equals eager's to float error."""
    from idemrt.backends.base import StepSpec, create_backend
    from idemrt.diffusion import DDPMSampler, DPS, Schedule
    from tiny_models import tiny_unet

    codec, unet = tiny_codec(), tiny_unet().eval()
    op = diffusion_operator(codec, "x")
    sampler = DDPMSampler(Schedule.create(1000, 10))
    g = torch.Generator().manual_seed(6)
    x, noise = torch.randn(1, 3, 128, 192, generator=g), torch.randn(1, 3, 128, 192, generator=g)
    with torch.no_grad():
        target = op(torch.rand(1, 3, 128, 192, generator=g) * 2 - 1)
    steps = []
    for operator_tile in (64, None):
        spec = StepSpec(unet=unet, operator=op, codec=codec, constraint="x", sampler=sampler, guidance=DPS(0.6),
                        tile=Tiling(window=32, stride=24, chunk=4, operator_tile=operator_tile))
        fast = create_backend("fast", spec, device=torch.device("cpu"), dtype=torch.float32,
                              operator_dtype=operator_dtype)
        assert isinstance(fast.operator, TiledOperator) == (operator_tile is not None)
        steps.append(fast.step(x, 7, target, noise))
    tol = 1e-4 if operator_dtype == torch.float32 else 2e-2
    torch.testing.assert_close(steps[0][0], steps[1][0], rtol=tol, atol=tol)
    if operator_dtype == torch.float32:
        spec = StepSpec(unet=unet, operator=op, codec=codec, constraint="x", sampler=sampler, guidance=DPS(0.6),
                        tile=Tiling(window=32, stride=24, chunk=4, operator_tile=64))
        eager = create_backend("eager", spec, device=torch.device("cpu")).step(x, 7, target, noise)
        torch.testing.assert_close(steps[0][0], eager[0], rtol=1e-4, atol=1e-4)


def test_backward_recomputes_under_the_forwards_autocast(codec64):
    # The fast backend's bf16 operator: the graph is taken after apply_operator has left autocast, so
    # the tiles' recomputation must re-enter it, or their VJP would be float32's, not the forward's.
    codec = tiny_codec()
    op = diffusion_operator(codec, "x")
    seen = []

    def recording(x):
        seen.append((torch.is_grad_enabled(), torch.is_autocast_enabled("cpu")))
        return op(x)

    tiled = TiledOperator(recording, TILE, 64, 64)
    x = (torch.rand(1, 3, 256, 256) * 2 - 1).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiled(x)
    torch.autograd.grad(out.float().sum(), x)
    assert seen == [(False, True)] * 4 + [(True, True)] * 4
