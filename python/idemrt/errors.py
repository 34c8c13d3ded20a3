"""Typed errors: every failure a user can cause maps to one of these."""


class IdemrtError(Exception):
    """Base class of all idemrt errors."""


class CheckpointError(IdemrtError):
    """A checkpoint cannot be read, is unsafe, or does not fit the architecture."""


class BitstreamError(IdemrtError):
    """A bitstream is malformed, truncated, forged or made for another codec."""


class ImageError(IdemrtError):
    """An input image cannot be read or converted."""


class DecodeError(IdemrtError):
    """Decoding failed (non-finite values, diverged encoder/decoder state)."""


class BackendError(IdemrtError):
    """A requested backend is unavailable or cannot run this configuration."""
