"""PSC: progressive posterior-sampling compression on an ADM UNet (docs/psc.md).

    data = idemrt.psc.Encoder(unet, s=16, r=12).encode("image.png", bpp=0.1)
    img = idemrt.psc.Decoder(unet).decode(data)                 # all rounds, projected restoration
    img = idemrt.psc.Decoder(unet).decode(data, rounds=10)      # a prefix: fewer bits, same file

Encoder and decoder rebuild the same measurement rows from the same model, noise and
measurements; that needs bit-identical arithmetic on both sides, which the row hashes in the
stream check (a diverged decoder raises :class:`idemrt.DecodeError`).

Names are imported on first use, so that the CLI can add its options without importing torch.
"""
from importlib import import_module

_LAZY = {
    "Decoder": "codec",
    "Encoder": "codec",
    "RESTORATIONS": "codec",
    "Stats": "codec",
    "rounds_for_bpp": "codec",
    "truncate": "codec",
    "DegenerateSamplesError": "rows",
    "Params": "stream",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'idemrt.psc' has no attribute {name!r}")
