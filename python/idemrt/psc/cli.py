"""``idemrt compress --codec psc`` and ``idemrt decompress`` of PSC files.

The main CLI (idemrt/cli.py) adds these options to its parsers and hands over when the codec is
PSC; everything PSC-specific lives here.
"""
from __future__ import annotations

import time

from ..cli_options import add_dtype_option, add_unet_options
from ..errors import BackendError, CheckpointError, IdemrtError


def add_compress_arguments(parser) -> None:
    """PSC options of ``idemrt compress`` (used with ``--codec psc``)."""
    g = parser.add_argument_group("PSC (--codec psc)")
    add_unet_options(g)
    g.add_argument("--bpp", type=float, help="target payload bits per pixel (default 0.1 unless --rounds)")
    g.add_argument("--rounds", type=int, help="number of rounds instead of --bpp")
    g.add_argument("--s", type=int, default=16, help="posterior samples per round")
    g.add_argument("--r", type=int, default=12, help="measurements per round (<= s - 1)")
    g.add_argument("--sampler-steps", dest="psc_steps", type=int, default=25, help="steps of each posterior sampler")
    g.add_argument("--psc-seed", type=int, default=0, help="seed of the noise shared with the decoder")
    g.add_argument("--hash-bits", type=int, default=16, help="row-hash bits per checkpoint (0 = none)")
    g.add_argument("--hash-every", type=int, default=1, help="rounds between row hashes")
    g.add_argument("--backend", choices=["eager", "fast"],
                   help="how the sampler's UNet runs (default: fast on CUDA and on CPUs with native bf16, else eager); decoders follow "
                        "the file")
    add_dtype_option(g, "UNet dtype of --backend fast (default bf16)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def add_decompress_arguments(parser) -> None:
    """PSC options of ``idemrt decompress`` (``--unet``, ``--preset``, ``--seed``, ``--backend`` and
    ``--dtype`` are shared; for a PSC file the last two choose the restoration's compute mode, the
    rows are rebuilt in the file's)."""
    g = parser.add_argument_group("PSC files")
    g.add_argument("--restoration", default="projected", choices=["projected", "guided"])
    g.add_argument("--rounds", type=int, help="decode only the first ROUNDS rounds (progressive)")
    g.add_argument("--restoration-steps", type=int, help="sampler steps of the restoration (default: the file's)")


def compress_cli(args) -> int:
    from .. import bitstream as bsfmt
    from ..fileio import atomic_write_bytes, check_output_path
    from ..images import load_image
    from ..models.unet_loading import load_unet
    from .codec import Encoder
    from ..defaults import dtype_from_name

    t0 = time.perf_counter()
    check_output_path(args.output, force=args.force, inputs=[args.input])
    if not args.unet:
        raise CheckpointError("--codec psc needs the diffusion model: pass --unet FILE (and --preset)")
    bpp = 0.1 if args.bpp is None and args.rounds is None else args.bpp
    unet = load_unet(args.unet, preset=args.preset, device=args.device)
    x = load_image(args.input)
    try:
        enc = Encoder(unet, s=args.s, r=args.r, steps=args.psc_steps, seed=args.psc_seed, device=args.device,
                      backend=args.backend, dtype=dtype_from_name(args.dtype), hash_bits=args.hash_bits,
                      hash_every=args.hash_every, progress=not args.quiet)
        data = enc.encode(x, bpp=bpp, rounds=args.rounds)
    except ValueError as exc:
        raise IdemrtError(str(exc)) from None
    atomic_write_bytes(args.output, data, force=args.force, inputs=[args.input])
    info = bsfmt.describe(bsfmt.unpack(data))
    print(f"{args.output}: {len(data)} bytes, {info['bpp']:.4f} bpp ({info['file_bpp']:.4f} with the header), "
          f"{info['width']}x{info['height']}, psc s={args.s} r={args.r} rounds={enc.last.rounds} "
          f"compute={enc.last.compute}; "
          f"{time.perf_counter() - t0:.2f} s")
    return 0


def decompress_cli(args, bs) -> int:
    from .. import bitstream as bsfmt
    from ..images import save_image
    from ..models.unet_loading import load_unet
    from .codec import Decoder
    from ..defaults import dtype_from_name

    t0 = time.perf_counter()
    if args.mse:
        raise IdemrtError("--mse does not apply to PSC files (PSC has no MSE decoder); drop --mse")
    if args.backend not in (None, "eager", "fast"):
        raise BackendError(f"PSC runs its UNet on the eager or fast backend, not {args.backend}; the rows are "
                           f"rebuilt in the file's compute mode, --backend/--dtype choose the restoration's")
    if not args.unet:
        raise CheckpointError("a PSC file needs the encoder's diffusion model: pass --unet FILE (and --preset)")
    unet = load_unet(args.unet, preset=args.preset, device=args.device)
    try:
        dec = Decoder(unet, device=args.device, backend=args.backend, dtype=dtype_from_name(args.dtype),
                      restoration_steps=args.restoration_steps, restoration_seed=args.seed, progress=not args.quiet)
        img = dec.decode(bs, restoration=args.restoration, rounds=args.rounds, output="tensor")
    except ValueError as exc:
        raise IdemrtError(str(exc)) from None
    save_image(img, args.output, force=args.force, inputs=[args.input])
    stats, total = dec.last, bs.extra["rounds"]
    prefix_bpp = 8 * (stats.rounds * bs.extra["r"]) / (bs.height * bs.width)
    print(f"{args.output}: {bs.width}x{bs.height}, {stats.rounds}/{total} rounds "
          f"({prefix_bpp:.4f} bpp of measurements, file {bsfmt.describe(bs)['bpp']:.4f} bpp), "
          f"{stats.hashes_checked} row hashes checked (rows computed {stats.compute}), {args.restoration} "
          f"restoration, measurement residual {stats.residual:.2e}, total {time.perf_counter() - t0:.2f} s")
    return 0
