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
    """Previews of ``size`` pixels on their longest side, copied to the host off the step's path.

    The previews asked for during one iteration are reduced together (:meth:`deliver`): one batch
    of device ops per image size instead of a dozen small ops per image, which on the CPU — where
    the core does the reduction itself — is most of what a preview costs."""

    def __init__(self, size: int):
        self.size = int(size)
        self._asked: list = []  # (x0, deliver) of this iteration, not reduced yet
        self._pending: collections.deque = collections.deque()  # (event, pixels, finite, delivers)

    def add(self, x0: torch.Tensor, deliver: Callable[[np.ndarray], None]) -> None:
        """Ask for the preview of ``x0`` (1, 3, h, w) in [-1, 1], cropped to the image; ``deliver``
        gets the (h', w', 3) uint8 array once it is on the host (reduced at the next
        :meth:`deliver`, with the iteration's other previews)."""
        self._asked.append((x0, deliver))

    @torch.no_grad()
    def _reduce(self) -> None:
        """Start the reduction and host copy of the previews asked for, one batch per size."""
        by_size: dict = {}
        for x0, deliver in self._asked:
            by_size.setdefault((tuple(x0.shape), x0.device), []).append((x0, deliver))
        self._asked = []
        for items in by_size.values():
            x0 = torch.cat([x for x, _ in items])
            scale = min(1.0, self.size / max(x0.shape[-2:]))
            if scale < 1:
                x0 = torch.nn.functional.interpolate(x0, scale_factor=scale, mode="area")
            finite = torch.isfinite(x0).flatten(1).all(1)
            # 8 bits as idemrt.images.to_uint8 rounds them: floor(x·255 + 0.5), clamped
            pixels = ((x0 + 1) / 2).mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
            delivers = [d for _, d in items]
            if x0.device.type != "cuda":
                self._pending.append((None, pixels, finite, delivers))
                continue
            host = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
            flags = torch.empty(finite.shape, dtype=torch.bool, pin_memory=True)
            host.copy_(pixels, non_blocking=True)
            flags.copy_(finite, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending.append((event, host, flags, delivers))

    def deliver(self) -> int:
        """Reduce what was asked for, then deliver the previews whose copies are done, in order;
        how many batches are still on their way."""
        if self._asked:
            self._reduce()
        while self._pending:
            event, pixels, finite, delivers = self._pending[0]
            if event is not None and not event.query():
                break
            self._pending.popleft()
            images = pixels.numpy()
            for k, (deliver, ok) in enumerate(zip(delivers, finite.tolist())):
                if ok:
                    deliver(images[k])
        return len(self._pending)
