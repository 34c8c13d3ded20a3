"""Previews of decodes in flight, at no extra network call and no sync on the engine's core.

A preview is the x0 estimate the guided step already computed (``ImageState.x0``, kept per image by
the sampler's persistent batch). The core reduces it on the device — crop, area downscale to the
preview size, [-1, 1] to 8-bit, a finiteness flag — and starts its copy into pinned host memory
(``non_blocking``, a CUDA event recorded after it); it never waits for it. Each iteration it
delivers the previews whose copies are done, in order; the client's side (the replica's event
loop) encodes them to PNG. On the CPU the copy is the reduction's own and the preview is delivered
at once. A non-finite estimate is not delivered: the sampler's check decides about that image.
"""
from __future__ import annotations

import collections
from typing import Callable

import numpy as np
import torch

__all__ = ["PreviewCopies"]


class PreviewCopies:
    """Previews of ``size`` pixels on their longest side, copied to the host off the step's path."""

    def __init__(self, size: int):
        self.size = int(size)
        self._pending: collections.deque = collections.deque()  # (event, pixels, finite, deliver)

    @torch.no_grad()
    def add(self, x0: torch.Tensor, deliver: Callable[[np.ndarray], None]) -> None:
        """Start the preview of ``x0`` (1, 3, h, w) in [-1, 1], cropped to the image; ``deliver``
        gets the (h', w', 3) uint8 array once it is on the host."""
        scale = min(1.0, self.size / max(x0.shape[-2:]))
        if scale < 1:
            x0 = torch.nn.functional.interpolate(x0, scale_factor=scale, mode="area")
        finite = torch.isfinite(x0).all().reshape(1)
        # 8 bits as idemrt.images.to_uint8 rounds them: floor(x·255 + 0.5), clamped
        pixels = ((x0[0] + 1) / 2).mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous()
        if x0.device.type != "cuda":
            self._pending.append((None, pixels, finite, deliver))
        else:
            host = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
            flag = torch.empty(1, dtype=torch.bool, pin_memory=True)
            host.copy_(pixels, non_blocking=True)
            flag.copy_(finite, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending.append((event, host, flag, deliver))
        self.deliver()

    def deliver(self) -> int:
        """Deliver the previews whose copies are done, in order; how many are still on their way."""
        while self._pending:
            event, pixels, finite, deliver = self._pending[0]
            if event is not None and not event.query():
                break
            self._pending.popleft()
            if bool(finite[0]):
                deliver(pixels.numpy())
        return len(self._pending)
