"""``idemrt export``: write the ONNX graphs (and optionally TensorRT engines) of a decoder setup.

    idemrt export out/ --preset ffhq256 --unet ffhq_10m.pt --codec bmshj2018-hyperprior \\
        --quality 1 --pretrained-codec --height 256 --width 256 --validate --check-tensorrt

writes ``out/step_gradient.onnx`` (the guided step: UNet, A and d dist/d x_t), ``out/unet.onnx``,
``out/analysis.onnx`` and ``out/synthesis.onnx`` (``--graphs`` picks a subset), each with a
dynamic batch; ``--dynamic-hw`` makes height and width dynamic too (multiples of 64).
``--validate`` runs every graph on onnxruntime (CPU) against PyTorch on random inputs (max
relative error <= 1e-4), ``--check-tensorrt`` runs the static TensorRT-parser check and
``--engine PRECISION`` builds TensorRT engines next to the graphs (needs TensorRT and a GPU).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from idemrt.cli_options import add_unet_options

__all__ = ["GRAPHS", "add_export_subparser", "main_export"]

GRAPHS = ("step_gradient", "unet", "analysis", "synthesis")


def add_export_subparser(subparsers) -> argparse.ArgumentParser:
    """Add the ``export`` command to an argparse ``add_subparsers()`` object; it runs :func:`main_export`."""
    from idemrt.diffusion import SAMPLERS

    p = subparsers.add_parser("export", help="ONNX graphs / TensorRT engines of the UNet, codec and guided step",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("output_dir")
    p.add_argument("--graphs", default=",".join(GRAPHS), help=f"comma-separated subset of {','.join(GRAPHS)}")
    add_unet_options(p)
    p.add_argument("--random-unet", action="store_true", help="random UNet weights (smoke tests, timing)")
    p.add_argument("--codec", default="bmshj2018-hyperprior", help="compressai model name")
    p.add_argument("--quality", type=int, default=None)
    p.add_argument("--codec-checkpoint", help="codec checkpoint file")
    p.add_argument("--pretrained-codec", action="store_true", help="download compressai's pretrained codec")
    p.add_argument("--random-codec", action="store_true", help="random codec weights (smoke tests, timing)")
    p.add_argument("--sampler", default="ddpm", choices=sorted(SAMPLERS),
                   help="the sampler whose table rows the step graph takes")
    p.add_argument("--constraint", default="x", choices=["x", "y"], help="the constraint of the step graph's A")
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--dynamic-hw", action="store_true", help="dynamic height/width (multiples of 64)")
    p.add_argument("--validate", action="store_true", help="compare onnxruntime (CPU) with PyTorch")
    p.add_argument("--check-tensorrt", action="store_true", help="static TensorRT-parser compatibility check")
    p.add_argument("--engine", choices=["fp32", "tf32", "fp16", "bf16"], help="also build TensorRT engines")
    p.add_argument("--max-batch", type=int, default=8, help="batch range of the engines' profile")
    p.add_argument("--device", default="cuda", help="GPU for --engine")
    p.set_defaults(func=main_export)
    return p


def _models(args, graphs):
    from idemrt.models.codec_loading import load_codec

    codec = load_codec(args.codec, quality=args.quality, checkpoint=args.codec_checkpoint,
                       pretrained=args.pretrained_codec, random_init=args.random_codec)
    unet = None
    if {"step_gradient", "unet"} & set(graphs):
        if args.random_unet:
            from idemrt.models.unet import PRESETS, ADMUNet

            unet = ADMUNet(PRESETS[args.preset]).eval().requires_grad_(False)
        elif args.unet:
            from idemrt.models.unet_loading import load_unet

            unet = load_unet(args.unet, preset=args.preset)
        else:
            from idemrt.errors import CheckpointError

            raise CheckpointError("the step_gradient and unet graphs need the diffusion model: "
                                  "pass --unet FILE (or --random-unet)")
    return unet, codec


def main_export(args) -> int:
    """Run ``idemrt export`` for parsed ``args`` (see :func:`add_export_subparser`); returns 0."""
    import torch

    from idemrt.errors import BackendError

    from idemrt.diffusion import diffusion_process, make_sampler

    from . import onnx_export as ox
    from .joint_graph import step_gradient_fn
    from .trt_ops import check_tensorrt_compatible

    graphs = [g.strip() for g in args.graphs.split(",") if g.strip()]
    unknown = sorted(set(graphs) - set(GRAPHS))
    if unknown or not graphs:
        raise BackendError(f"unknown graphs {unknown}; choose from {', '.join(GRAPHS)}")
    if args.engine and args.dynamic_hw:
        raise BackendError("--engine builds fixed-size engines: drop --dynamic-hw")
    unet, codec = _models(args, graphs)
    out_dir = Path(args.output_dir)
    H, W, dyn = args.height, args.width, args.dynamic_hw
    operator = ox.codec_operator(codec, args.constraint)
    # the rows' layout and the prior's prediction/variance types (a diffusers folder's own); not the respacing
    process = diffusion_process(unet)
    sampler = make_sampler(args.sampler, process.schedule(), process=process)
    with torch.no_grad():
        y_shape = tuple(codec.analysis(torch.zeros(1, 3, H, W)).shape[1:])
        target_shape = tuple(operator(torch.zeros(1, 3, H, W)).shape[1:])

    jobs = {
        "step_gradient": (
            lambda p: ox.export_step_gradient(unet, p, H, W, codec=codec, constraint=args.constraint,
                                              sampler=sampler, dynamic_hw=dyn),
            step_gradient_fn(unet, operator, sampler),
            lambda n: ox.interior_step_inputs(unet, n, H, W, target_shape, sampler),
        ),
        "unet": (
            lambda p: ox.export_unet(unet, p, H, W, dynamic_hw=dyn),
            lambda x, t: (unet(x, t),),
            lambda n: (torch.randn(n, 3, H, W), torch.linspace(999.0, 0.0, n)),
        ),
        "analysis": (
            lambda p: ox.export_analysis(codec, p, H, W, dynamic_hw=dyn),
            lambda x: (codec.analysis(x),),
            lambda n: (torch.rand(n, 3, H, W),),
        ),
        "synthesis": (
            lambda p: ox.export_synthesis(codec, p, y_shape, dynamic_hw=dyn),
            lambda y: (codec.synthesis(y),),
            lambda n: (torch.randn(n, *y_shape) * 4,),
        ),
    }
    for name in graphs:
        export, reference, make_inputs = jobs[name]
        t0 = time.perf_counter()
        graph = export(out_dir / f"{name}.onnx")
        facts = [f"{graph.path}", f"sha256 {graph.sha256[:16]}", f"exported in {time.perf_counter() - t0:.1f} s"]
        if args.validate:
            torch.manual_seed(0)
            worst = {}
            for n in (1, 2):
                for k, v in ox.validate_with_onnxruntime(graph, reference, make_inputs(n)).items():
                    worst[k] = max(worst.get(k, 0.0), v)
            facts.append("onnxruntime vs PyTorch max rel. error " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
        if args.check_tensorrt:
            check_tensorrt_compatible(graph.path)
            facts.append("TensorRT parser check OK")
        if args.engine:
            facts.append(_build_engine(graph, args))
        print("; ".join(facts), flush=True)
    return 0


def _build_engine(graph, args) -> str:
    import onnx
    import torch

    from .tensorrt_build import build_engine, import_tensorrt, require_cuda

    import_tensorrt()
    device = torch.device(args.device)
    require_cuda(device)
    model = onnx.load(str(graph.path), load_external_data=False)
    profile = {}
    for i in model.graph.input:
        rest = tuple(d.dim_value for d in i.type.tensor_type.shape.dim[1:])
        profile[i.name] = ((1, *rest), (1, *rest), (args.max_batch, *rest))
    path = graph.path.with_suffix(f".{args.engine}.engine")
    with torch.cuda.device(device):
        path.write_bytes(build_engine(graph.path, precision=args.engine, profile=profile,
                                      timing_cache=graph.path.parent / "timing.cache"))
    return f"engine {path}"
