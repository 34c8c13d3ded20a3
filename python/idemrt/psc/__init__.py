"""PSC: progressive posterior-sampling compression on an ADM UNet (docs/psc.md).

    data = idemrt.psc.Encoder(unet, s=16, r=12).encode("image.png", bpp=0.1)
    img = idemrt.psc.Decoder(unet).decode(data)                 # all rounds, projected restoration
    img = idemrt.psc.Decoder(unet).decode(data, rounds=10)      # a prefix: fewer bits, same file

Encoder and decoder rebuild the same measurement rows from the same model, noise and
measurements; that needs bit-identical arithmetic on both sides, which the row hashes in the
stream check (a diverged decoder raises :class:`idemrt.DecodeError`).

Names are imported on first use, so that the CLI can add its options without importing torch.
"""
from idemrt.lazy import lazy_getattr

_LAZY = {  # module -> the names it provides
    ".codec": ("Decoder", "Encoder", "RESTORATIONS", "Stats", "rounds_for_bpp", "truncate"),
    ".rows": ("DegenerateSamplesError",),
    ".stream": ("Params",),
}

__all__ = sorted(name for names in _LAZY.values() for name in names)

__getattr__ = lazy_getattr(__name__, _LAZY, globals())
