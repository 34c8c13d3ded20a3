"""``idemrt models list|info|verify DIR`` and ``idemrt decompress --models DIR [--prior ID]``
(the command line of the model store, :mod:`idemrt.store`; docs/model_store.md)."""
from __future__ import annotations

import sys

from .errors import CheckpointError

EXIT_UNAVAILABLE = 3  # idemrt.cli.EXIT_BAD_INPUT


def add_models_subparser(subparsers) -> None:
    p = subparsers.add_parser("models", help="list, describe and verify a model store (docs/model_store.md)",
                              description="A model store is a directory of models, each a folder with a "
                                          "model.json manifest (docs/model_store.md).")
    sub = p.add_subparsers(dest="models_command", required=True)
    ls = sub.add_parser("list", help="every model with its status (manifests checked, files hashed)")
    ls.add_argument("store", metavar="DIR")
    ls.set_defaults(func=cmd_models_list)
    info = sub.add_parser("info", help="one model's manifest and status (its file hashed and loaded)")
    info.add_argument("store", metavar="DIR")
    info.add_argument("id", metavar="ID")
    info.set_defaults(func=cmd_models_info)
    verify = sub.add_parser("verify", help="hash and load every model; exit 3 if any is unavailable")
    verify.add_argument("store", metavar="DIR")
    verify.set_defaults(func=cmd_models_verify)


def add_decompress_options(parser) -> None:
    parser.add_argument("--models", default=None, metavar="DIR",
                        help="take the codec the file's header names (and --prior) from this model store")
    parser.add_argument("--prior", default=None, metavar="ID", help="with --models: the prior's id in the store")


def _print_rows(rows) -> None:
    widths = [max([len(h)] + [len(str(r[k])) for r in rows]) for h, k in
              (("ID", "id"), ("KIND", "kind"), ("ARCHITECTURE", "architecture"))]
    print(f"{'ID':<{widths[0]}}  {'KIND':<{widths[1]}}  {'ARCHITECTURE':<{widths[2]}}  STATUS")
    for r in rows:
        status = r["status"] + (f": {r['reason']}" if r["reason"] else "")
        print(f"{r['id']:<{widths[0]}}  {r['kind']:<{widths[1]}}  {r['architecture']:<{widths[2]}}  {status}")


def cmd_models_list(args) -> int:
    from .store import ModelStore

    store = ModelStore(args.store).check()
    _print_rows(store.rows())
    return 0


def cmd_models_info(args) -> int:
    from .store import ModelStore

    entry = ModelStore(args.store).entry(args.id)
    entry.verify()
    for key, value in entry.describe().items():
        if value is not None:
            print(f"{key}: {value}")
    return 0


def cmd_models_verify(args) -> int:
    from .store import ModelStore

    store = ModelStore(args.store)
    ok = store.verify()
    rows = store.rows()
    _print_rows(rows)
    if not rows:
        print(f"idemrt: error: {store.root}: no models (no folder with a model.json)", file=sys.stderr)
        return EXIT_UNAVAILABLE
    if not ok:
        bad = [r for r in rows if r["status"] != "available"]
        for r in bad:
            print(f"idemrt: error: model {r['id']!r} is unavailable: {r['reason']}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    return 0


def models_for_decompress(args, bs):
    """``(codec, unet or None)`` of ``idemrt decompress --models DIR``: the codec the header of ``bs``
    names, and the prior ``--prior ID`` for a perceptual decode."""
    from .store import ModelStore

    given = [flag for flag, on in (("--codec-checkpoint", args.codec_checkpoint),
                                   ("--pretrained-codec", args.pretrained_codec), ("--unet", args.unet)) if on]
    if given:
        raise CheckpointError(f"--models takes every model from the store; drop {', '.join(given)}")
    store = ModelStore(args.models, device=args.device)
    codec = store.codec_for(bs)
    if args.mse:
        return codec, None
    if args.prior is None:  # a command names its prior, even when the store has one only
        priors = [e.id for e in store.of_kind("prior")]
        raise CheckpointError(f"a perceptual decode needs a prior: pass --prior ID (the store's priors: "
                              f"{', '.join(priors) or 'none'}), or --mse")
    return codec, store.prior(args.prior)  # store.choose_prior checks it is one
