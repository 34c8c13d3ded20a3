"""The one progress bar of long work (decoding steps, PSC rounds): tqdm, or nothing."""
from __future__ import annotations

from typing import Iterable, Optional


def progress_bar(total: Optional[int], enabled: bool, desc: str, unit: str, iterable: Optional[Iterable] = None):
    """A tqdm bar over ``iterable`` (or counting to ``total``), or None — ``iterable`` itself when
    one is given — if ``enabled`` is false."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit)
