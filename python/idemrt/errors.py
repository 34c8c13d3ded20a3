"""Typed errors: every failure a user can cause maps to one of these."""


class IdemrtError(Exception):
    """Base class of all idemrt errors."""


class CheckpointError(IdemrtError):
    """A checkpoint cannot be read, is unsafe, or does not fit the architecture."""


class BitstreamError(IdemrtError):
    """A bitstream is malformed, truncated, forged or made for another codec."""


class ImageError(IdemrtError):
    """An input image cannot be read or converted."""


class TooLargeError(IdemrtError):
    """An input is over a configured size limit (pixels, bytes): not malformed, refused by policy."""


class BitstreamTooLargeError(BitstreamError, TooLargeError):
    """A well-formed bitstream whose image is larger than the reader's ``max_pixels``."""


class ImageTooLargeError(ImageError, TooLargeError):
    """An image with more pixels than ``max_pixels``."""


class DecodeError(IdemrtError):
    """Decoding failed (non-finite values, diverged encoder/decoder state)."""


class BackendError(IdemrtError):
    """A requested backend is unavailable or cannot run this configuration."""


class ModelNotFoundError(CheckpointError):
    """The weights a request needs are not among the models given (a model store): names exactly what
    is needed (``codec``, ``quality``, ``weights_digest`` of a stream; or ``model_id``)."""

    def __init__(self, message: str, *, codec=None, quality=None, weights_digest=None, model_id=None):
        super().__init__(message)
        self.codec, self.quality, self.weights_digest, self.model_id = codec, quality, weights_digest, model_id


# The decode queue's errors (idemrt.batching raises them): here, so that the service's
# error mapping (serve/problems.py) needs no torch. Their bases are Python's, as a client expects.
class QueueFullError(RuntimeError):
    """The batcher holds ``max_queue`` images already: retry later."""


class DeadlineExceeded(TimeoutError):
    """An image was still being decoded when its deadline passed."""


class EngineClosedError(QueueFullError):
    """The batcher (a service's engine core) shut down before the image was decoded: retry elsewhere
    (to a client it is what a full queue is: unavailable now)."""
