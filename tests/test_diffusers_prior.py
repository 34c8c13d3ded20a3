"""diffusers priors: a UNet2DModel folder through idemrt.load_unet and the Decoder.

Folders are written by diffusers itself (``UNet2DModel(...).save_pretrained``, ``DDPMScheduler`` /
``DDIMScheduler.save_config``), with configurations shaped like google's DDPM models (CIFAR-10-32,
CelebA-HQ-256, LSUN church/bedroom-256), reduced (fewer channels and blocks, 32x32 / 64x64 images)
and random weights. The reference for a guided step is diffusers' own ``scheduler.step`` on
diffusers' own model output, with the DPS gradient taken by torch autograd through its
``pred_original_sample``: nothing of idemrt's sampler math is used in it.
"""
import json
import pickle

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import idemrt  # noqa: E402
from idemrt.models.codec import diffusion_operator  # noqa: E402
from idemrt.models.diffusers_unet import DiffusersUNet  # noqa: E402
from tiny_models import tiny_codec  # noqa: E402

# google/ddpm-cifar10-32: 4 levels (128, 256, 256, 256), attention at the second, 2 blocks a level.
CIFAR10 = dict(sample_size=32, block_out_channels=(32, 64, 64, 64), layers_per_block=1,
               down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
# google/ddpm-celebahq-256, -church-256, -bedroom-256: 6 levels (128, 128, 256, 256, 512, 512),
# attention at the fifth (16x16 of 256).
LSUN256 = dict(sample_size=64, block_out_channels=(32, 32, 32, 64, 64, 64), layers_per_block=1,
               down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4)
COMMON = dict(in_channels=3, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6,
              norm_num_groups=32, mid_block_scale_factor=1, act_fn="silu", attention_head_dim=None)
# the google/ddpm-* scheduler: DDPMScheduler, 1000 linear steps 1e-4 .. 0.02, fixed_small, clip_sample
GOOGLE = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
              variance_type="fixed_small", clip_sample=True, prediction_type="epsilon")

# (name, unet config, scheduler class, scheduler config changes, idemrt sampler)
CASES = {
    "celebahq-ddpm": (LSUN256, "DDPMScheduler", {}, "ddpm"),
    "church-v-fixed_large-scaled": (LSUN256, "DDPMScheduler",
                                    dict(prediction_type="v_prediction", variance_type="fixed_large",
                                         beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012), "ddpm"),
    "bedroom-sample-learned_range-cosine": (LSUN256, "DDPMScheduler",
                                            dict(prediction_type="sample", variance_type="learned_range",
                                                 beta_schedule="squaredcos_cap_v2", clip_sample=False), "ddpm"),
    "cifar10-learned-range2": (CIFAR10, "DDPMScheduler",
                               dict(variance_type="learned", clip_sample_range=2.0), "ddpm"),
    "cifar10-ddim": (CIFAR10, "DDIMScheduler", {}, "ddim"),
    "cifar10-ddim-v": (CIFAR10, "DDIMScheduler", dict(prediction_type="v_prediction"), "ddim"),
}
LEARNED = ("learned", "learned_range")


def scheduler_config(cls: str, changes: dict) -> dict:
    cfg = {**GOOGLE, **changes}
    if cls == "DDIMScheduler":
        cfg.pop("variance_type")
    return cfg


def write_folder(path, unet_cfg: dict, sched_cls: str, sched_changes: dict, seed: int = 0, layout: str = "flat"):
    """A diffusers folder written by diffusers; ``layout`` "pipeline": unet/ and scheduler/ subfolders."""
    sched_cfg = scheduler_config(sched_cls, sched_changes)
    learned = sched_cfg.get("variance_type") in LEARNED
    torch.manual_seed(seed)
    model = diffusers.UNet2DModel(**COMMON, **unet_cfg, out_channels=6 if learned else 3)
    if sched_cfg.get("variance_type") == "learned":
        # diffusers' "learned" reads the second half as the variance itself: keep it positive.
        with torch.no_grad():
            model.conv_out.weight[3:].mul_(0.01)
            model.conv_out.bias[3:].fill_(0.02)
    unet_dir = path / "unet" if layout == "pipeline" else path
    sched_dir = path / "scheduler" if layout == "pipeline" else path
    model.save_pretrained(unet_dir)
    scheduler = getattr(diffusers, sched_cls)(**sched_cfg)
    scheduler.save_config(sched_dir)
    return model.eval(), sched_cfg


@pytest.fixture(scope="module")
def codec():
    return tiny_codec()


def reference_step(model, sched_cls, sched_cfg, operator, x_t, t, target, noise, scale, steps):
    """x_{t-1} of the guided DPS step, by diffusers' scheduler API and autograd."""
    scheduler = getattr(diffusers, sched_cls)(**sched_cfg)
    scheduler.set_timesteps(steps)
    x = x_t.clone().requires_grad_(True)
    out = model(x, t).sample
    if sched_cls == "DDIMScheduler":
        res = scheduler.step(out, t, x, eta=1.0, use_clipped_model_output=True, variance_noise=noise)
    else:
        # DDPMScheduler.step draws its noise with randn_tensor from the generator: the same draw as `noise`
        gen = torch.Generator().manual_seed(1234)
        assert torch.equal(torch.randn(noise.shape, generator=torch.Generator().manual_seed(1234)), noise)
        res = scheduler.step(out, t, x, generator=gen)
    dist = torch.linalg.vector_norm((target - operator(res.pred_original_sample)).flatten(1), dim=1)
    (grad,) = torch.autograd.grad(dist.sum(), x)
    return (res.prev_sample - scale * grad).detach(), dist.detach(), scheduler.timesteps


@pytest.mark.parametrize("case", sorted(CASES))
def test_guided_step_equals_diffusers(tmp_path, codec, case):
    unet_cfg, sched_cls, changes, sampler = CASES[case]
    layout = "pipeline" if case.startswith("cifar10-ddim") else "flat"
    model, sched_cfg = write_folder(tmp_path, unet_cfg, sched_cls, changes, layout=layout)
    unet = idemrt.load_unet(tmp_path)
    assert isinstance(unet, DiffusersUNet)
    steps, scale, size = 10, 0.6, unet_cfg["sample_size"]
    dec = idemrt.Decoder(codec, unet, steps=f"ddim{steps}", sampler=sampler, guidance="dps", scale=scale,
                         backend="eager", device="cpu")
    operator = diffusion_operator(codec, "x")
    torch.manual_seed(1)
    n = 2
    x_t = torch.randn(n, 3, size, size)
    with torch.no_grad():
        target = operator(torch.rand(n, 3, size, size) * 2 - 1)
    noise = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1234))
    checked = 0
    for i in (steps - 1, steps // 2, 1, 0):
        t = int(dec.sampler.timesteps[i])
        want, want_dist, timesteps = reference_step(model, sched_cls, sched_cfg, operator, x_t, t, target, noise,
                                                    scale, steps)
        # idemrt's respacing "ddimN" is diffusers' leading spacing (steps_offset 0)
        assert dec.sampler.timesteps.flip(0).tolist() == timesteps.tolist()
        got, dist = dec.step(x_t, i, target, noise)
        assert torch.isfinite(want).all()
        torch.testing.assert_close(dist, want_dist, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        checked += 1
    assert checked == 4


def test_reference_is_sensitive(tmp_path, codec):
    """The comparison can fail: another prediction type in the folder gives another step."""
    unet_cfg, sched_cls, changes, _ = CASES["cifar10-ddim"]
    model, sched_cfg = write_folder(tmp_path, unet_cfg, sched_cls, dict(prediction_type="sample"))
    dec = idemrt.Decoder(codec, idemrt.load_unet(tmp_path), steps="ddim10", sampler="ddim", guidance="dps",
                         backend="eager", device="cpu")
    operator = diffusion_operator(codec, "x")
    torch.manual_seed(1)
    x_t, noise = torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        target = operator(torch.rand(1, 3, 32, 32) * 2 - 1)
    want, _, _ = reference_step(model, sched_cls, scheduler_config(sched_cls, {}), operator, x_t, 500, target,
                                noise, 0.6, 10)
    got, _ = dec.step(x_t, 5, target, noise)
    assert (got - want).abs().max() > 1e-2


@pytest.mark.parametrize("options", [
    dict(sampler="ddpm", guidance="dps"),
    dict(sampler="ddim", guidance="dsg", start=0.6, exact=True),
    dict(sampler="ddim", guidance="pir"),
])
def test_whole_decode(tmp_path, codec, options):
    write_folder(tmp_path, CIFAR10, "DDPMScheduler", {}, layout="pipeline")
    unet = idemrt.load_unet(tmp_path)
    torch.manual_seed(0)
    image = torch.rand(1, 3, 40, 48)
    data = idemrt.Encoder(codec).encode(image)
    dec = idemrt.Decoder(codec, unet, steps=4, backend="eager", device="cpu", **options)
    out = dec.decode(data, seed=0, output="tensor")
    assert out.shape == (1, 3, 40, 48) and torch.isfinite(out).all()
    assert dec.process is unet.diffusion_process and dec.schedule.original_num_steps == 1000


def test_fast_backend_fp32(tmp_path, codec):
    """The fast backend's generic path (inference copy, channels-last) runs a diffusers prior in fp32
    and equals eager; bf16 is refused with a clear error (it needs ADM's mixed-precision layout)."""
    write_folder(tmp_path, CIFAR10, "DDPMScheduler", {})
    unet = idemrt.load_unet(tmp_path)
    eager = idemrt.Decoder(codec, unet, steps=10, backend="eager", device="cpu")
    fast = idemrt.Decoder(codec, unet, steps=10, backend="fast", dtype=torch.float32, device="cpu")
    torch.manual_seed(2)
    x_t, noise = torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32)
    target = eager.operator(torch.rand(1, 3, 32, 32) * 2 - 1).detach()
    a, b = eager.step(x_t, 7, target, noise), fast.step(x_t, 7, target, noise)
    torch.testing.assert_close(b[0], a[0], rtol=1e-4, atol=1e-4)
    assert idemrt.Decoder(codec, unet, backend="fast", device="cpu").dtype == torch.float32  # not bf16
    with pytest.raises(idemrt.BackendError, match="float32"):
        idemrt.Decoder(codec, unet, steps=10, backend="fast", dtype=torch.bfloat16, device="cpu").backend
    with pytest.raises(idemrt.BackendError, match="ADM UNet"):  # the fused kernels are ADM's
        idemrt.Decoder(codec, unet, steps=10, backend="fast", device="cpu",
                       backend_options={"kernels": "triton"}).backend


@pytest.mark.slow  # about a minute on a 2-core CPU: the ONNX export of the step graph
def test_onnxruntime_step(tmp_path, codec):
    """The exported step graph (UNet forward + operator + input gradient) of a diffusers prior runs
    in onnxruntime and equals the eager step."""
    pytest.importorskip("onnxruntime")
    write_folder(tmp_path / "prior", dict(sample_size=32, block_out_channels=(32, 32), layers_per_block=1,
                                          down_block_types=("AttnDownBlock2D", "DownBlock2D"),
                                          up_block_types=("UpBlock2D", "AttnUpBlock2D")),
                 "DDPMScheduler", dict(prediction_type="v_prediction"))
    unet = idemrt.load_unet(tmp_path / "prior")
    eager = idemrt.Decoder(codec, unet, steps=10, backend="eager", device="cpu")
    ort = idemrt.Decoder(codec, unet, steps=10, backend="onnxruntime", device="cpu",
                         backend_options={"cache_dir": str(tmp_path / "cache")})
    torch.manual_seed(2)
    x_t, noise = torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32)
    target = eager.operator(torch.rand(1, 3, 32, 32) * 2 - 1).detach()
    (a, da), (b, db) = eager.step(x_t, 7, target, noise), ort.step(x_t, 7, target, noise)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(db, da, rtol=1e-4, atol=1e-4)


def _folder_codec_stream(tmp_path, codec):
    """A CIFAR-10-shaped diffusers folder, the codec saved as a checkpoint, and a 32x32 .idm."""
    from idemrt.models.checkpoint_io import save_state_dict

    folder = tmp_path / "prior"
    write_folder(folder, CIFAR10, "DDPMScheduler", {})
    ckpt = tmp_path / "codec.safetensors"
    save_state_dict(codec.model.state_dict(), ckpt)
    torch.manual_seed(0)
    return folder, ckpt, idemrt.Encoder(codec).encode(torch.rand(1, 3, 32, 32))


def _decoded(codec, folder, data, seed, **config):
    decoder = idemrt.Decoder(codec, idemrt.load_unet(folder),
                             config=idemrt.DecodeConfig(**{"steps": 3, "backend": "eager", **config}))
    return decoder.decode(data, seed=seed, output="tensor")


def test_cli_decompress_folder(tmp_path, codec, capsys):
    import numpy as np
    from PIL import Image

    from idemrt.cli import main

    folder, ckpt, data = _folder_codec_stream(tmp_path, codec)
    (tmp_path / "a.idm").write_bytes(data)
    out = tmp_path / "a.png"
    main(["decompress", str(tmp_path / "a.idm"), str(out), "--unet", str(folder), "--steps", "3", "--seed", "2",
          "--codec-checkpoint", str(ckpt), "--backend", "eager", "--device", "cpu", "--quiet",
          "--no-tile"])  # the padded 64² is above the prior's 32²: the CLI would tile, the reference does not
    got = np.asarray(Image.open(out).convert("RGB"), dtype=np.int16)
    want = (_decoded(codec, folder, data, 2)[0].permute(1, 2, 0).clamp(0, 1) * 255).numpy()
    # the same computation; 1 level allows a value that lands on an 8-bit rounding boundary
    assert got.shape == (32, 32, 3) and np.abs(got - want).max() <= 1.0


# -- bad folders ----------------------------------------------------------------------------------
def _good(tmp_path):
    write_folder(tmp_path, CIFAR10, "DDPMScheduler", {})
    return tmp_path


def test_bad_folders(tmp_path):
    import safetensors.torch

    def fails(folder, match):
        with pytest.raises(idemrt.CheckpointError, match=match):
            idemrt.load_unet(folder)

    empty = tmp_path / "empty"
    empty.mkdir()
    fails(empty, "no config.json")

    folder = _good(tmp_path / "no_sched")
    (folder / "scheduler_config.json").unlink()
    fails(folder, "scheduler_config.json")

    folder = _good(tmp_path / "no_weights")
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    fails(folder, "no weights file")

    folder = _good(tmp_path / "bad_json")
    (folder / "config.json").write_text("{not json")
    fails(folder, "unreadable JSON")

    folder = _good(tmp_path / "wrong_shape")  # config says 32 base channels, weights have 64
    cfg = json.loads((folder / "config.json").read_text())
    cfg["block_out_channels"] = [64, 64, 64, 64]
    (folder / "config.json").write_text(json.dumps(cfg))
    fails(folder, "shape mismatches")

    folder = _good(tmp_path / "variance_channels")  # learned variance needs 6 output channels
    sched = json.loads((folder / "scheduler_config.json").read_text())
    sched["variance_type"] = "learned_range"
    (folder / "scheduler_config.json").write_text(json.dumps(sched))
    fails(folder, "out_channels")

    folder = _good(tmp_path / "scheduler_kind")
    sched["_class_name"] = "EulerDiscreteScheduler"
    (folder / "scheduler_config.json").write_text(json.dumps(sched))
    fails(folder, "not supported")

    folder = _good(tmp_path / "non_finite")
    path = folder / "diffusion_pytorch_model.safetensors"
    state = safetensors.torch.load_file(path)
    state["conv_in.weight"][0, 0, 0, 0] = float("nan")
    safetensors.torch.save_file(state, path)
    fails(folder, "non-finite")

    folder = _good(tmp_path / "pickle")  # a .bin that is not weights-only: refused, never run
    state = safetensors.torch.load_file(folder / "diffusion_pytorch_model.safetensors")
    (folder / "diffusion_pytorch_model.safetensors").unlink()

    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    with open(folder / "diffusion_pytorch_model.bin", "wb") as f:
        pickle.dump({"state": state, "evil": Evil()}, f)
    fails(folder, "refused to load")

    folder = _good(tmp_path / "bin")  # a weights-only .bin is fine
    state = safetensors.torch.load_file(folder / "diffusion_pytorch_model.safetensors")
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(state, folder / "diffusion_pytorch_model.bin")
    assert isinstance(idemrt.load_unet(folder), DiffusersUNet)


def test_service_engine_decodes_with_a_folder(tmp_path, codec):
    """`idemrt serve --unet FOLDER`'s engine (ServeConfig.unet a diffusers folder, loaded by the
    engine's core thread as the service does) decodes as the Decoder does with the same folder."""
    from idemrt.serve import ServeConfig
    from idemrt.serve.core import DecodeEngine

    folder, ckpt, data = _folder_codec_stream(tmp_path, codec)
    config = ServeConfig(unet=str(folder), codec_checkpoint=str(ckpt), quality=codec.quality, steps_allowed=["3"],
                         backend="eager")
    engine = DecodeEngine(config, device="cpu")
    try:
        got = engine.submit(data, seed=5).result(timeout=120)
    finally:
        engine.close()
    want = _decoded(codec, folder, data, 5, tile=True)  # the service's default: the padded 64x64 in 32-pixel windows
    assert got.image.shape == want.shape == (1, 3, 32, 32)
    torch.testing.assert_close(got.image, want, rtol=0, atol=2e-5)
