"""The ``idemrt`` command line: compress, decompress, info, convert-checkpoint, demo, eval, export, serve, models.

Exit codes: 0 success; 2 usage error; 3 bad input (bitstream, image, checkpoint, existing output);
4 decoding failed; 1 anything else.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings

from .cli_options import (add_backend_option, add_dtype_option, add_sampling_options, add_tile_options,
                          add_unet_options, decode_config_from_args)
from .defaults import configure_cpu_threads
from .errors import BackendError, BitstreamError, CheckpointError, DecodeError, IdemrtError, ImageError
from .fileio import SameFileError

# A bitstream larger than this is refused before it is read into memory.
MAX_BITSTREAM_BYTES = 1 << 30

EXIT_BAD_INPUT = 3
EXIT_DECODE = 4


def _read_bitstream(path) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BITSTREAM_BYTES + 1)
    except OSError as exc:
        raise BitstreamError(f"cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_BITSTREAM_BYTES:
        raise BitstreamError(f"{path}: larger than {MAX_BITSTREAM_BYTES} bytes; not an .idm bitstream")
    return data


def _codec_from_args(name, quality, checkpoint, pretrained, device):
    from .models.codec_loading import load_codec

    return load_codec(name, quality=quality, checkpoint=checkpoint, pretrained=pretrained, device=device)


def cmd_compress(args) -> int:
    import torch

    from . import bitstream as bsfmt
    from .api import Encoder, entropy_decode
    from .fileio import atomic_write_bytes, check_output_path
    from .images import load_image, mse255, psnr

    if args.codec == "psc":
        from .psc.cli import compress_cli

        return compress_cli(args)
    t0 = time.perf_counter()
    check_output_path(args.output, force=args.force, inputs=[args.input])
    codec = _codec_from_args(args.codec, args.quality, args.checkpoint, args.pretrained, args.device)
    x = load_image(args.input)
    data = Encoder(codec).encode(x)
    atomic_write_bytes(args.output, data, force=args.force, inputs=[args.input])
    bs = bsfmt.unpack(data)
    with torch.no_grad():
        x_mse = codec.synthesis(entropy_decode(codec, bs)).clamp(0, 1)[..., : bs.height, : bs.width].cpu()
    info = bsfmt.describe(bs)
    print(
        f"{args.output}: {len(data)} bytes, {info['bpp']:.4f} bpp, {bs.width}x{bs.height}, "
        f"{bsfmt.codec_label(bs.codec, bs.quality)}; MSE decode PSNR {psnr(mse255(x, x_mse)):.2f} dB; "
        f"{time.perf_counter() - t0:.2f} s"
    )
    return 0


def cmd_decompress(args) -> int:
    import torch

    from . import bitstream as bsfmt
    from .api import Decoder
    from .fileio import check_output_path
    from .images import mse255, psnr, save_image

    try:
        config = decode_config_from_args(args)
    except (ValueError, TypeError, OSError) as exc:  # a bad --config file or option: a usage error
        args.parser.error(str(exc))
    if args.print_config:
        print(config.to_json(indent=2))
        return 0
    if args.input is None or args.output is None:
        args.parser.error("the following arguments are required: input, output")
    if args.server:
        from .serve.cli import decompress_from_server

        return decompress_from_server(args)
    t0 = time.perf_counter()
    check_output_path(args.output, force=args.force, inputs=[args.input])
    bs = bsfmt.unpack(_read_bitstream(args.input))
    if args.models:
        from .store_cli import models_for_decompress

        codec, unet = models_for_decompress(args, bs)
    elif args.prior:
        raise CheckpointError("--prior ID names a prior of a model store: pass --models DIR too")
    elif bs.codec == "psc":
        from .psc.cli import decompress_cli

        return decompress_cli(args, bs)
    else:
        codec = _codec_from_args(bs.codec, bs.quality, args.codec_checkpoint, args.pretrained_codec, args.device)
        unet = None
    if not args.mse and unet is None:
        if not args.unet:
            raise CheckpointError("a perceptual decode needs the diffusion model: pass --unet FILE (or --mse)")
        from .models.unet_loading import load_unet

        unet = load_unet(args.unet, preset=args.preset)
    decoder = Decoder(codec, unet, config=config, device=args.device, progress=not args.quiet)
    if not args.mse:  # the tiling choice, before the (long) decode
        from .diffusion.tiling import describe_tiling

        print(describe_tiling(config.tile, unet, bs.padded_height, bs.padded_width), flush=True)
    img = decoder.decode(bs, seed=args.seed, mode="mse" if args.mse else "perceptual", output="tensor")
    stats = decoder.last
    save_image(img, args.output, force=args.force, inputs=[args.input])
    facts = [f"{args.output}: {bs.width}x{bs.height}", f"{bsfmt.describe(bs)['bpp']:.4f} bpp"]
    if not args.mse:
        x_mse = decoder.decode(bs, mode="mse", output="tensor")
        facts += [
            f"{stats.steps} steps",
            f"final constraint distance {stats.distance[0]:.4f}",
            f"PSNR vs MSE decode {psnr(mse255(img, x_mse)):.2f} dB",
            f"sampling {stats.timings['sample']:.2f} s",
            f"backend {decoder.backend_name} on {decoder.device}"
            + (f" ({torch.get_num_threads()} threads)" if decoder.device.type == "cpu" else ""),
        ]
    facts.append(f"total {time.perf_counter() - t0:.2f} s")
    print(", ".join(facts))
    return 0


def cmd_info(args) -> int:
    from . import bitstream as bsfmt

    for key, value in bsfmt.describe(bsfmt.unpack(_read_bitstream(args.input))).items():
        print(f"{key}: {value}")
    return 0


def cmd_convert(args) -> int:
    from .models.checkpoint_io import output_format
    from .models.codec_loading import convert_checkpoint

    fmt = output_format(args.output, args.format)
    name = convert_checkpoint(args.input, args.output, name=args.codec, force=args.force, fmt=fmt)
    print(f"{args.output}: written ({name}, compressai state_dict, {fmt} format)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .psc.cli import add_compress_arguments as add_psc_compress_arguments
    from .psc.cli import add_decompress_arguments as add_psc_decompress_arguments
    from .store_cli import add_decompress_options as add_store_decompress_options

    p = argparse.ArgumentParser(prog="idemrt", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="image -> .idm bitstream with an MSE codec")
    c.add_argument("input")
    c.add_argument("output")
    c.add_argument("--codec", required=True, help="compressai model name, e.g. bmshj2018-hyperprior, or psc")
    c.add_argument("--quality", type=int, default=None)
    c.add_argument("--checkpoint", help="codec checkpoint file (compressai, old compressai or ELiC-ReImplementation)")
    c.add_argument("--pretrained", action="store_true", help="download compressai's pretrained weights")
    c.add_argument("--device", default="cpu")
    c.add_argument("--force", action="store_true", help="overwrite an existing output file")
    add_psc_compress_arguments(c)
    c.set_defaults(func=cmd_compress)

    d = sub.add_parser("decompress", help=".idm bitstream -> PNG (perceptual, or --mse)")
    d.add_argument("input", nargs="?")  # required, except with --print-config
    d.add_argument("output", nargs="?")
    d.add_argument("--mse", action="store_true", help="the MSE codec's own reconstruction")
    add_unet_options(d)
    d.add_argument("--codec-checkpoint", help="the codec checkpoint the file was made with")
    d.add_argument("--pretrained-codec", action="store_true", help="use compressai's pretrained codec")
    add_sampling_options(d, steps=None, scale=None, speed=True)  # also --speed, --start, --exact
    add_tile_options(d)
    d.add_argument("--server", default=None, metavar="URL",
                   help="decode on an idemrt service (idemrt serve) instead of locally: no models needed here")
    d.add_argument("--constraint", default=None, choices=["x", "y"], help="(default x)")
    d.add_argument("--max-retries", type=int, default=None, help="(default 0)")
    d.add_argument("--device", default=None)
    add_dtype_option(d, "compute dtype of the UNet (default: the backend's)")
    add_backend_option(d)
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.add_argument("--force", action="store_true", help="overwrite an existing output file")
    add_psc_decompress_arguments(d)
    add_store_decompress_options(d)
    d.set_defaults(func=cmd_decompress, parser=d)

    i = sub.add_parser("info", help="describe an .idm bitstream")
    i.add_argument("input")
    i.set_defaults(func=cmd_info)

    v = sub.add_parser("convert-checkpoint", help="convert a codec checkpoint to compressai's format (safetensors)")
    v.add_argument("input", help="codec checkpoint: safetensors or PyTorch (.pth.tar, .pt; read weights-only)")
    v.add_argument("output", help="written as safetensors, or as a PyTorch file if named .pt/.pth/.pth.tar")
    v.add_argument("--codec", default=None, help="model name when it cannot be inferred")
    v.add_argument("--format", choices=["safetensors", "torch"], default=None,
                   help="output format (default: torch for .pt/.pth/.pth.tar names, safetensors otherwise)")
    v.add_argument("--force", action="store_true")
    v.set_defaults(func=cmd_convert)

    from .demo import add_subparsers as add_demo_subparsers

    add_demo_subparsers(sub)
    from .export.cli import add_export_subparser

    add_export_subparser(sub)
    from .serve.cli import add_serve_subparser

    add_serve_subparser(sub)
    from .store_cli import add_models_subparser

    add_models_subparser(sub)
    return p


def main(argv=None) -> int:
    # compressai imports torch_geometric, whose import-time torch.jit.script calls warn on recent torch:
    # noise about a dependency's internals that a command-line user can do nothing about.
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    args = build_parser().parse_args(argv)
    configure_cpu_threads()
    try:
        return args.func(args)
    except (BitstreamError, ImageError, CheckpointError, FileExistsError, SameFileError, BackendError) as exc:
        print(f"idemrt: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except DecodeError as exc:
        print(f"idemrt: decoding failed: {exc}", file=sys.stderr)
        return EXIT_DECODE
    except IdemrtError as exc:
        print(f"idemrt: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("idemrt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
