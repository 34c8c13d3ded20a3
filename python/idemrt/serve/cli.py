"""``idemrt serve`` and ``idemrt decompress --server URL`` (the command line of the service)."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from ..cli_options import add_unet_options
from ..speeds import SPEEDS


def add_serve_subparser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="a decode service on Ray Serve (HTTP, continuous batching)",
                              description="Serve perceptual decodes over HTTP (docs/serving.md).")
    add_unet_options(p, unet_help="ADM UNet checkpoint (without it: MSE decodes only)")
    p.add_argument("--codec", default="bmshj2018-hyperprior", help="compressai model name")
    p.add_argument("--quality", type=int, default=None)
    p.add_argument("--codec-checkpoint", help="the codec checkpoint of the files to decode")
    p.add_argument("--pretrained-codec", action="store_true", help="compressai's pretrained codec (downloads)")
    p.add_argument("--steps", default=None, help="comma-separated respacings a request may ask for; the first "
                                                 "is the default (e.g. 1000,100; 'ddim200' too; default: the "
                                                 "--speed preset's)")
    p.add_argument("--speed", default=None, choices=sorted(SPEEDS),
                   help="the decode preset (docs/fast_modes.md; default paper: DPS-1000)")
    p.add_argument("--replicas", type=int, default=1, help="decoder replicas (the initial count when autoscaling)")
    p.add_argument("--min-replicas", type=int, default=None,
                   help="autoscale the decoder replicas on ongoing requests, down to this many (default 1 "
                        "with --max-replicas)")
    p.add_argument("--max-replicas", type=int, default=None, help="... and up to this many")
    p.add_argument("--proxy-location", default="HeadOnly", choices=["HeadOnly", "EveryNode"],
                   help="Serve's HTTP proxies: on the head node only (default) or on every node")
    p.add_argument("--gpus-per-replica", type=float, default=None,
                   help="GPUs per decoder replica (default: 1 if CUDA is available, else 0: CPU)")
    p.add_argument("--cpus-per-replica", type=float, default=1.0,
                   help="CPU cores each decoder replica reserves (default 1); Ray sets a replica's threads "
                        "($OMP_NUM_THREADS) from it: give a CPU-only replica the cores of its node")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-slots", type=int, default=16, help="images per batched step")
    p.add_argument("--queue", type=int, default=256, help="images a replica holds before answering 503")
    p.add_argument("--pixel-budget", type=int, default=0, help="pixels per batched step (0: derived by the engine)")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request deadline, seconds (then 504)")
    p.add_argument("--speeds", default=None, help="comma-separated speed presets a request may ask for "
                                                  "(default: all, --speed first)")
    p.add_argument("--tile", action=argparse.BooleanOptionalAction, default=True,
                   help="decode images larger than the prior's native size in windows of it, each window a slot "
                        "of the step batch (default); --no-tile: the prior on the whole image (docs/tiling.md)")
    p.add_argument("--max-windows", type=int, default=1024, help="windows an image may take (more: 413)")
    p.add_argument("--max-pixels", type=int, default=4096 * 4096, help="an image's pixels, padded (more: 413)")
    p.add_argument("--deterministic", action="store_true",
                   help="an image's result does not depend on its batch (one backend call per image; slower)")
    p.add_argument("--address", default=None, help="join this Ray cluster ('auto': the local one) instead of "
                                                   "starting an embedded instance")
    p.add_argument("--demo", action="store_true", help="serve the bundled demo models (no files needed)")
    p.add_argument("--models", default=None, metavar="DIR",
                   help="serve every codec and prior of this model store (docs/model_store.md); streams are "
                        "routed by their header, a request picks a prior by id (prior=ID)")
    p.add_argument("--prior", default=None, metavar="ID", help="with --models: the default prior's id")
    p.add_argument("--print-config", action="store_true", help="print the YAML for `serve deploy` and exit")
    p.set_defaults(func=cmd_serve)


def config_from_args(args):
    from .config import ServeConfig

    gpus = args.gpus_per_replica
    if gpus is None:
        import torch

        gpus = 1.0 if torch.cuda.is_available() else 0.0
    steps = None if args.steps is None else [s.strip() for s in args.steps.split(",") if s.strip()]  # two: "100,ddim50"
    scale = dict(replicas=args.replicas, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                 proxy_location=args.proxy_location, pixel_budget=args.pixel_budget,
                 deterministic=args.deterministic, cpus_per_replica=args.cpus_per_replica, tile=args.tile,
                 max_windows=args.max_windows, max_pixels=args.max_pixels,
                 speeds_allowed=None if args.speeds is None else [s.strip() for s in args.speeds.split(",") if s.strip()])
    if args.models or args.prior:
        from ..errors import CheckpointError

        given = [f for f, on in (("--unet", args.unet), ("--codec-checkpoint", args.codec_checkpoint),
                                 ("--pretrained-codec", args.pretrained_codec), ("--demo", args.demo)) if on]
        if given or not args.models:
            raise CheckpointError(f"--models DIR serves the store's models only; drop {', '.join(given)}" if given
                                  else "--prior ID names a prior of a model store: pass --models DIR too")
        return ServeConfig(models=os.path.abspath(args.models), prior=args.prior, steps_allowed=steps,
                           speed=args.speed, gpus_per_replica=gpus, max_slots=args.max_slots, queue=args.queue,
                           timeout_s=args.timeout, **scale)
    if args.demo:
        return ServeConfig.demo(gpus_per_replica=gpus, max_slots=args.max_slots, queue=args.queue,
                                timeout_s=args.timeout, speed=args.speed, **scale,
                                **({"steps_allowed": steps} if steps else {}))
    # Replicas may run on other machines of a cluster: files by absolute path.
    unet, ckpt = (os.path.abspath(p) if p else None for p in (args.unet, args.codec_checkpoint))
    return ServeConfig(unet=unet, preset=args.preset, codec=args.codec, quality=args.quality,
                       codec_checkpoint=ckpt, pretrained_codec=args.pretrained_codec,
                       steps_allowed=steps, speed=args.speed, gpus_per_replica=gpus,
                       max_slots=args.max_slots, queue=args.queue, timeout_s=args.timeout, **scale)


def cmd_serve(args) -> int:
    config = config_from_args(args)
    from .runner import deploy_config, start_service

    if args.print_config:
        print(deploy_config(config, port=args.port), end="")
        return 0
    start_service(config, host=args.host, port=args.port, address=args.address)
    replicas = f"{config.min_replicas}-{config.max_replicas}" if config.autoscaling else config.replicas
    print(f"idemrt serve: http://{args.host}:{args.port}/v1/decode ({replicas} replica(s), "
          f"{'GPU' if config.gpus_per_replica else 'CPU'}; steps {', '.join(config.steps_allowed)}); Ctrl-C or SIGTERM stops")
    page_host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host  # a wildcard: this machine
    print(f"idemrt serve: web page at http://{page_host}:{args.port}/")
    # Ctrl-C, and SIGTERM (a service manager, `kill PID`, a background job whose SIGINT is ignored),
    # both stop the application and the embedded Ray instance.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    return 0


def decompress_from_server(args) -> int:
    """``idemrt decompress IN OUT --server URL``: the decode runs on the service."""
    from ..fileio import atomic_write_bytes, check_output_path
    from .client import Client

    t0 = time.perf_counter()
    check_output_path(args.output, force=args.force, inputs=[args.input])
    with open(args.input, "rb") as f:
        data = f.read()
    steps = None if args.steps is None else str(args.steps)
    fmt = "webp" if str(args.output).lower().endswith(".webp") else "png"
    result = Client(args.server).decode(data, mode="mse" if args.mse else "perceptual", seed=args.seed,
                                        steps=steps, format=fmt)
    atomic_write_bytes(args.output, result.image, force=args.force)
    print(f"{args.output}: decoded by {args.server} (replica {result.replica}), {result.steps} steps, "
          f"final constraint distance {result.distance:.4f}, server {result.seconds:.2f} s, "
          f"total {time.perf_counter() - t0:.2f} s", file=sys.stdout)
    return 0
