"""diffusers priors: a local ``UNet2DModel`` folder as an idemrt UNet.

A folder holds the model's ``config.json`` and weights (``diffusion_pytorch_model.safetensors``,
or ``.bin`` read with ``torch.load(weights_only=True)``) and a ``scheduler_config.json``
(``DDPMScheduler`` or ``DDIMScheduler``), either side by side or as a diffusers pipeline lays them
out (``unet/`` and ``scheduler/`` subfolders). The network is diffusers' own module, built from
the config; :class:`DiffusersUNet` wraps it in the call idemrt's samplers use for every prior,
``model(x, t) -> (N, C_out, H, W)`` with t the original timesteps, and carries the folder's
:class:`~idemrt.diffusion.process.DiffusionProcess` (its betas, prediction type, variance type and
``clip_sample``), which the Decoder's DDPM/DDIM samplers then use.

Nothing is downloaded: only local folders are read (the diffusers package is needed:
``pip install 'idemrt[diffusers]'``). A folder that is not a usable prior raises
:class:`idemrt.CheckpointError`.

Not used from the scheduler config: ``timestep_spacing`` and ``steps_offset`` (the Decoder's
``steps`` are guided-diffusion respacings of the folder's training steps) and DDIM's
``set_alpha_to_one`` (idemrt's DDIM always ends at abar = 1, diffusers' default). Refused:
``thresholding`` and ``fixed_large_log`` variance.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..diffusion.process import PREDICTIONS, VARIANCES, DiffusionProcess
from ..errors import CheckpointError
from .checkpoint_io import check_keys, load_state_dict

__all__ = ["DiffusersUNet", "SCHEDULERS", "WEIGHT_NAMES", "is_diffusers_folder", "load_diffusers_unet",
           "process_from_scheduler_config"]

WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")  # in this order
SCHEDULERS = ("DDPMScheduler", "DDIMScheduler")  # scheduler configs whose process idemrt samples


class DiffusersUNet(nn.Module):
    """A diffusers ``UNet2DModel`` with idemrt's UNet call: ``forward(x, t)`` -> the model output
    (N, out_channels, H, W), t the original timesteps (N,). ``diffusion_process``: the folder's
    process (see :func:`idemrt.diffusion.diffusion_process`).

    It runs in float32: ``compute_dtype`` is what a Decoder without an explicit ``dtype`` gives its
    backend (the fast backend's bf16/fp16 need ADM's mixed-precision layout and are refused with a
    BackendError); the fast backend's channels-last inference copy and CUDA graphs apply as for any
    module, its Triton kernels do not (they are wired through ADM's GroupNorm)."""

    compute_dtype = torch.float32
    norm_act_hook = False  # its GroupNorms are diffusers' own
    size_multiple = 1  # diffusers' UNet2DModel checks its own sizes

    def __init__(self, model: nn.Module, process: DiffusionProcess, source: str = ""):
        super().__init__()
        self.model = model
        self.diffusion_process = process
        self.source = source

    @property
    def config(self):
        """The diffusers model config."""
        return self.model.config

    @property
    def image_size(self) -> Optional[int]:
        """The side it was trained at: the config's ``sample_size`` (the first of a pair)."""
        size = self.config.get("sample_size")
        size = size[0] if isinstance(size, (tuple, list)) else size
        return size if isinstance(size, int) and size > 0 else None

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.model(x, t, return_dict=False)[0]


def is_diffusers_folder(source) -> bool:
    """Whether ``source`` names a directory (which :func:`idemrt.load_unet` reads as a diffusers folder)."""
    return isinstance(source, (str, os.PathLike)) and os.path.isdir(source)


def _diffusers():
    try:
        import diffusers
    except ImportError:
        raise ImportError("loading a diffusers folder needs the diffusers package: "
                          "pip install 'idemrt[diffusers]'") from None
    return diffusers


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def _model_dir(folder: Path) -> Path:
    for d in (folder / "unet", folder):
        if (d / "config.json").is_file():
            return d
    raise CheckpointError(f"{folder}: not a diffusers UNet folder: no config.json in it or in its unet/ subfolder")


def _scheduler_config_path(folder: Path, model_dir: Path) -> Path:
    candidates = [folder / "scheduler" / "scheduler_config.json", folder / "scheduler_config.json",
                  model_dir / "scheduler_config.json", model_dir.parent / "scheduler" / "scheduler_config.json"]
    for path in candidates:
        if path.is_file():
            return path
    raise CheckpointError(f"{folder}: no scheduler_config.json (looked in the folder, its scheduler/ subfolder and "
                          f"next to the UNet); idemrt does not guess a prior's noise schedule")


def _weights_path(model_dir: Path) -> Path:
    for name in WEIGHT_NAMES:
        if (model_dir / name).is_file():
            return model_dir / name
    raise CheckpointError(f"{model_dir}: no weights file ({' or '.join(WEIGHT_NAMES)}; sharded or variant "
                          f"checkpoints are not read)")


def process_from_scheduler_config(config: dict, where: str = "scheduler config") -> DiffusionProcess:
    """The :class:`DiffusionProcess` of a ``DDPMScheduler``/``DDIMScheduler`` config (a dict, as in
    ``scheduler_config.json``). The cumulative alphas are computed by diffusers' own scheduler
    class (float32, as it samples), then held in float64."""
    diffusers = _diffusers()
    name = config.get("_class_name", "DDPMScheduler")
    if name not in SCHEDULERS:
        raise CheckpointError(f"{where}: scheduler {name!r} is not supported; idemrt samples the DDPM/DDIM "
                              f"process of a {' or '.join(SCHEDULERS)} config")
    if config.get("thresholding", False):
        raise CheckpointError(f"{where}: dynamic thresholding (thresholding=true) is not supported")
    prediction = config.get("prediction_type", "epsilon")
    variance = config.get("variance_type") or "fixed_small"  # DDIM configs have none: DDPMScheduler's default
    if prediction not in PREDICTIONS:
        raise CheckpointError(f"{where}: prediction_type {prediction!r} is not one of {sorted(PREDICTIONS)}")
    if variance not in VARIANCES:
        raise CheckpointError(f"{where}: variance_type {variance!r} is not one of {sorted(VARIANCES)}")
    try:
        scheduler = getattr(diffusers, name).from_config(config)
        abar = scheduler.alphas_cumprod.double().cpu().numpy()
        clip = float(config.get("clip_sample_range", 1.0)) if config.get("clip_sample", True) else None
        return DiffusionProcess(abar, PREDICTIONS[prediction], VARIANCES[variance], clip, name=f"{where} ({name})")
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure here is a bad config
        raise CheckpointError(f"{where}: not a usable {name} config: {exc}") from None


def _build_model(config: dict, where: Path) -> nn.Module:
    diffusers = _diffusers()
    name = config.get("_class_name", "UNet2DModel")
    if name != "UNet2DModel":
        raise CheckpointError(f"{where}: a {name!r} model; idemrt's diffusers priors are unconditional UNet2DModel")
    checks = {"in_channels": (config.get("in_channels", 3), 3),
              "time_embedding_type": (config.get("time_embedding_type", "positional"), "positional")}
    for key, (value, want) in checks.items():
        if value != want:
            raise CheckpointError(f"{where}: {key} = {value!r}; an RGB pixel-space DDPM prior has {want!r}")
    for key in ("class_embed_type", "num_class_embeds"):
        if config.get(key) is not None:
            raise CheckpointError(f"{where}: class-conditional UNet2DModel ({key} = {config[key]!r}) is not supported")
    try:
        with torch.device("meta"):
            return diffusers.UNet2DModel.from_config(config)
    except Exception as exc:  # noqa: BLE001 - any failure here is a bad config
        raise CheckpointError(f"{where}: not a valid UNet2DModel config: {exc}") from None


def load_diffusers_unet(folder, *, device=None, sha256: Optional[str] = None) -> DiffusersUNet:
    """An inference-ready :class:`DiffusersUNet` (eval mode, fp32, no gradients) from a local
    diffusers folder (layouts: see the module doc). ``sha256`` pins the weights file.

    Raises CheckpointError for a folder that is not a usable prior: missing or unreadable config,
    weights or scheduler config; weights that do not fit the config (keys, shapes, non-float or
    non-finite values) or are an unsafe pickle; an unsupported model or scheduler."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a directory")
    model_dir = _model_dir(folder)
    config_path = model_dir / "config.json"
    config = _read_json(config_path)
    sched_path = _scheduler_config_path(folder, model_dir)
    process = process_from_scheduler_config(_read_json(sched_path), str(sched_path))
    model = _build_model(config, config_path)
    out_channels = model.config.out_channels
    want = 6 if process.variance.learned else 3
    if out_channels != want:
        raise CheckpointError(f"{config_path}: out_channels = {out_channels}, but variance_type "
                              f"{process.variance.name!r} needs {want}")

    weights_path = _weights_path(model_dir)
    what = f"diffusers UNet2DModel ({model_dir})"
    state = load_state_dict(weights_path, sha256, name_pin=False)
    fix = getattr(model, "_fix_state_dict_keys_on_load", None)  # diffusers' renaming of old attention keys
    if fix is not None:
        state = fix(dict(state)) or state
    check_keys(state, {k: v.shape for k, v in model.state_dict().items()}, what)
    not_float = [f"{k} ({v.dtype})" for k, v in state.items() if not v.is_floating_point()]
    if not_float:
        raise CheckpointError(f"{what}: non floating-point tensors: {', '.join(not_float[:10])}")
    weights = {}
    for k in list(state):
        weights[k] = state.pop(k).to(device=device, dtype=torch.float32).contiguous()
    bad = [k for k, v in weights.items() if not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{what}: non-finite values in {', '.join(bad[:10])}")
    model.load_state_dict(weights, strict=True, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # a tensor that is neither a parameter nor a persistent buffer (not in the file)
        raise CheckpointError(f"{what}: tensors not set by the checkpoint: {', '.join(left[:10])}")
    unet = DiffusersUNet(model, process, source=str(folder))
    return unet.eval().requires_grad_(False)

