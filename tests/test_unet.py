"""ADM UNet: architecture against the official key manifests, numerics against the
independent float64 re-implementation in adm_reference.py."""
import dataclasses
import json
import pathlib

import pytest
import torch

import adm_reference as ref
from idemrt.models.unet import (
    PRESETS,
    ADMUNet,
    AttentionBlock,
    ResBlock,
    UNetConfig,
    norm_act,
    timestep_embedding,
    unet_config,
)

DATA = pathlib.Path(__file__).parent / "data"
TOL = 1e-5  # relative (Frobenius) error of the fp32 model vs float64

# Small configs covering every option that changes the graph. 32x32 images, widths >= 32 (GroupNorm32).
TINY = dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2", learn_sigma=True,
            attention_resolutions="16", num_head_channels=16, use_scale_shift_norm=True, resblock_updown=True)
CONFIGS = {
    "tiny": TINY,
    # standalone Downsample/Upsample convs, additive embedding, num_heads (+ a different decoder count), new order
    "conv_resample": dict(TINY, learn_sigma=False, resblock_updown=False, use_scale_shift_norm=False,
                          num_head_channels=-1, num_heads=2, num_heads_upsample=4, use_new_attention_order=True),
    # three levels, two blocks per level, attention at two resolutions (int-free string), dropout (identity in eval)
    "deep": dict(TINY, num_res_blocks=2, channel_mult="1,1,2", attention_resolutions="16,8", dropout=0.1),
    # attention at full resolution given as an int, legacy order with num_heads
    "full_res_attn": dict(TINY, image_size=16, attention_resolutions=16, num_head_channels=-1, num_heads=2),
}


def rel_err(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def randomized(module, seed=0):
    """Load non-zero random weights (also into ADM's zero-initialised layers); return them as float64."""
    state = ref.random_state({k: v.shape for k, v in module.state_dict().items()}, seed)
    module.load_state_dict(state)
    return ref.to64(state)


def inputs(n=2, size=32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=gen) * 2 - 1
    t = torch.tensor([999, 17, 500, 0][:n])
    return x, t


# ------------------------------------------------------------------------------ architecture


@pytest.mark.parametrize("name", ["ffhq256", "imagenet256"])
def test_preset_state_dict_matches_official_manifest(name):
    with torch.device("meta"):
        model = ADMUNet(PRESETS[name])
    manifest = json.loads((DATA / f"unet_{name}_keys.json").read_text())
    got = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert got == list(manifest.items())  # keys, shapes and order
    assert list(model.buffers()) == []
    n_params = {"ffhq256": 93_563_910, "imagenet256": 552_814_086}[name]  # docs/reference_code.md §1.1
    assert sum(p.numel() for p in model.parameters()) == n_params


@pytest.mark.parametrize("name", ["ffhq256", "imagenet256"])
def test_presets_are_the_official_configs(name):
    official = json.loads((DATA / "unet_configs.json").read_text())[name]
    assert UNetConfig(**official) == PRESETS[name]


def test_preset_forward_on_meta_device():
    with torch.device("meta"):
        model = ADMUNet(PRESETS["ffhq256"])
        y = model(torch.empty(1, 3, 256, 256), torch.empty(1))
    assert y.shape == (1, 6, 256, 256) and y.is_meta


def test_zero_initialised_layers_as_in_adm():
    model = ADMUNet(UNetConfig(**TINY))
    state = model.state_dict()
    zeroed = {k for k in state if k.startswith("out.2.") or ".out_layers.3." in k or ".proj_out." in k}
    assert {k.rsplit(".", 2)[0] for k in zeroed} >= {"out", "middle_block.1", "middle_block.0.out_layers"}
    assert all(not state[k].any() for k in zeroed)
    assert all(state[k].any() for k in state if state[k].ndim > 1 and k not in zeroed)


# ------------------------------------------------------------------------------ config


def test_config_parsing():
    assert UNetConfig(512, 128, 1).channel_mults == (0.5, 1, 1, 2, 2, 4, 4)
    assert UNetConfig(64, 128, 1).channel_mults == (1, 2, 3, 4)
    assert UNetConfig(32, 32, 1, channel_mult="1,2,2").channel_mults == (1, 2, 2)
    assert UNetConfig(32, 32, 1, channel_mult=(1, 2)).channel_mults == (1, 2)
    assert PRESETS["imagenet256"].attention_ds == {8, 16, 32}
    assert PRESETS["ffhq256"].attention_ds == {16}
    assert PRESETS["ffhq256"].out_channels == 6 and UNetConfig(64, 32, 1).out_channels == 3


def test_config_overrides():
    cfg = unet_config("ffhq256", num_channels=64, learn_sigma=False)
    assert cfg == dataclasses.replace(PRESETS["ffhq256"], num_channels=64, learn_sigma=False)
    assert unet_config(PRESETS["imagenet256"]) == PRESETS["imagenet256"]
    assert unet_config(**TINY) == UNetConfig(**TINY)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(image_size=100, num_channels=32, num_res_blocks=1), "no default channel_mult"),
        (dict(image_size=64, num_channels=48, num_res_blocks=1), "multiple of the 32"),
        (dict(image_size=64, num_channels=32, num_res_blocks=1, channel_mult="1,x"), "channel_mult"),
        (dict(image_size=64, num_channels=32, num_res_blocks=1, channel_mult="1,0"), "positive"),
        (dict(image_size=64, num_channels=32, num_res_blocks=1, attention_resolutions="a"), "attention_resolutions"),
        (dict(image_size=64, num_channels=32, num_res_blocks=0), "num_res_blocks"),
        (dict(image_size=64, num_channels=32, num_res_blocks=1, class_cond=True), "class-conditional"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UNetConfig(**kwargs)


def test_bad_heads_and_arguments():
    with pytest.raises(ValueError, match="num_head_channels"):
        ADMUNet(UNetConfig(**dict(TINY, num_head_channels=24)))
    with pytest.raises(ValueError, match="num_heads"):
        ADMUNet(UNetConfig(**dict(TINY, num_head_channels=-1, num_heads=3)))
    with pytest.raises(ValueError, match="preset"):
        unet_config()
    with pytest.raises(ValueError, match="unknown UNet preset"):
        unet_config("ffhq512")
    with pytest.raises(TypeError, match="num_chanels"):
        unet_config("ffhq256", num_chanels=3)


# ------------------------------------------------------------------------------ numerics per block


def test_timestep_embedding():
    t = torch.tensor([0, 1, 17, 500, 999])
    emb = timestep_embedding(t, 128)
    assert rel_err(emb, ref.timestep_embedding(t, 128)) < 1e-7
    assert torch.equal(emb[0], torch.cat([torch.ones(64), torch.zeros(64)]))  # cos first
    assert torch.equal(timestep_embedding(t.float(), 128), emb)
    odd = timestep_embedding(t, 33)
    assert odd.shape == (5, 33) and not odd[:, -1].any()
    assert rel_err(odd, ref.timestep_embedding(t, 33)) < 1e-7


@pytest.mark.parametrize("c_in, c_out", [(32, 32), (64, 32), (32, 64)])
@pytest.mark.parametrize("scale_shift", [True, False])
def test_resblock(c_in, c_out, scale_shift):
    block = ResBlock(c_in, 48, c_out, use_scale_shift_norm=scale_shift)
    sd = randomized(block)
    assert ("skip_connection.weight" in sd) == (c_in != c_out)
    x, emb = torch.randn(2, c_in, 8, 8), torch.randn(2, 48)
    want = ref.resblock(sd, "", x.double(), emb.double(), scale_shift=scale_shift)
    assert rel_err(block(x, emb), want) < TOL


@pytest.mark.parametrize("direction", ["up", "down"])
@pytest.mark.parametrize("scale_shift", [True, False])
def test_resampling_resblock(direction, scale_shift):
    block = ResBlock(32, 48, use_scale_shift_norm=scale_shift, **{direction: True})
    sd = randomized(block)
    x, emb = torch.randn(2, 32, 8, 8), torch.randn(2, 48)
    resample = ref.nearest_up if direction == "up" else ref.avg_down
    want = ref.resblock(sd, "", x.double(), emb.double(), scale_shift=scale_shift, resample=resample)
    got = block(x, emb)
    assert got.shape == want.shape == (2, 32, *(2 * (16 if direction == "up" else 4,)))
    assert rel_err(got, want) < TOL


@pytest.mark.parametrize("new_order", [False, True])
@pytest.mark.parametrize("channels, heads", [(64, 1), (64, 4), (96, 3)])
def test_attention_block(new_order, channels, heads):
    block = AttentionBlock(channels, heads, new_order=new_order)
    sd = randomized(block)
    x = torch.randn(2, channels, 4, 6)
    got = block(x)
    assert rel_err(got, ref.attention(sd, "", x.double(), heads, new_order=new_order)) < TOL
    if heads > 1:  # the comparison can tell the two QKV layouts apart
        assert rel_err(got, ref.attention(sd, "", x.double(), heads, new_order=not new_order)) > 1e-2


def test_attention_block_channels_last():
    block = AttentionBlock(64, 4)
    sd = randomized(block)
    x = torch.randn(2, 64, 4, 4).to(memory_format=torch.channels_last)
    assert rel_err(block(x), ref.attention(sd, "", x.double(), 4, new_order=False)) < TOL


# ------------------------------------------------------------------------------ full model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_full_model_matches_float64_reference(name):
    cfg = CONFIGS[name]
    model = ADMUNet(UNetConfig(**cfg)).eval()
    sd = randomized(model)
    x, t = inputs(size=cfg["image_size"])
    with torch.no_grad():
        got = model(x, t)
    want = ref.unet(sd, cfg, x.double(), t)
    assert got.shape == (2, 6 if cfg["learn_sigma"] else 3, cfg["image_size"], cfg["image_size"])
    assert rel_err(got, want) < TOL
    # sensitivity: another timestep changes the output far beyond the tolerance
    assert rel_err(got, ref.unet(sd, cfg, x.double(), t.flip(0))) > 1e-3


def test_input_gradient_matches_float64_reference():
    model = ADMUNet(UNetConfig(**TINY)).eval()
    sd = randomized(model)
    model.requires_grad_(False)
    x, t = inputs()
    w = torch.randn(2, 6, 32, 32, generator=torch.Generator().manual_seed(3))
    x32 = x.clone().requires_grad_(True)
    (g32,) = torch.autograd.grad((model(x32, t) * w).sum(), x32)
    x64 = x.double().requires_grad_(True)
    (g64,) = torch.autograd.grad((ref.unet(sd, TINY, x64, t) * w.double()).sum(), x64)
    assert rel_err(g32, g64) < TOL
    assert all(p.grad is None for p in model.parameters())


def test_float_and_integer_timesteps_and_channels_last():
    model = ADMUNet(UNetConfig(**TINY)).eval()
    randomized(model)
    x, t = inputs()
    with torch.no_grad():
        y = model(x, t)
        assert torch.equal(model(x, t.float()), y)
        y_cl = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), t)
    assert rel_err(y_cl, y.double()) < TOL


def test_adm_mixed_precision_layout():
    """guided-diffusion's convert_to_fp16 layout (convs of the three block stacks in low precision;
    time embedding, Linear, GroupNorm and output head fp32): forward casts at those boundaries."""
    model = ADMUNet(UNetConfig(**TINY)).eval()
    sd = randomized(model)
    for stack in (model.input_blocks, model.middle_block, model.output_blocks):
        for m in stack.modules():
            if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d)):
                m.to(torch.bfloat16)
    x, t = inputs()
    with torch.no_grad():
        y = model(x, t)
    assert y.dtype == torch.float32
    assert rel_err(y, ref.unet(sd, TINY, x.double(), t)) < 3e-2  # bfloat16 has an 8-bit mantissa


def test_norm_act_hook_replaces_every_use():
    model = ADMUNet(UNetConfig(**TINY)).eval()
    randomized(model)
    x, t = inputs()
    with torch.no_grad():
        y = model(x, t)
        calls = []

        def spy(h, norm, scale_shift=None):
            calls.append(scale_shift is not None)
            return norm_act(h, norm, scale_shift)

        model.set_norm_act(spy)
        assert torch.equal(model(x, t), y)
        n_res = sum(isinstance(m, ResBlock) for m in model.modules())
        assert calls.count(True) == n_res and calls.count(False) == n_res + 1  # + the output head

        model.set_norm_act(lambda h, norm, scale_shift=None: torch.zeros_like(h))
        assert not torch.equal(model(x, t), y)
        model.set_norm_act(None)
        assert torch.equal(model(x, t), y)


@pytest.mark.parametrize(
    "x_shape, t_shape, match",
    [((2, 4, 32, 32), (2,), r"\[N, 3, H, W\]"), ((2, 3, 31, 32), (2,), "multiples of 2"),
     ((2, 3, 32, 32), (3,), "t of shape")],
)
def test_forward_rejects_bad_shapes(x_shape, t_shape, match):
    with torch.device("meta"):
        model = ADMUNet(UNetConfig(**TINY))
        with pytest.raises(ValueError, match=match):
            model(torch.empty(x_shape), torch.empty(t_shape))


@pytest.mark.slow
def test_traces_as_one_graph():
    """torch.compile(fullgraph=True) fails on any graph break (data-dependent control flow,
    .item(), ...), which would also stand in the way of CUDA graphs."""
    torch._dynamo.reset()
    model = ADMUNet(UNetConfig(**TINY)).eval().requires_grad_(False)
    randomized(model)
    x, t = inputs()
    compiled = torch.compile(model, fullgraph=True, backend="eager", dynamic=False)
    with torch.no_grad():
        assert torch.equal(compiled(x, t), model(x, t))
