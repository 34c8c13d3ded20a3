"""Names of a package imported on first use (PEP 562), so that importing the package — and the
CLI adding its options — stays light: torch, compressai and the models load when needed."""
from __future__ import annotations

from importlib import import_module
from typing import Callable


def lazy_getattr(package: str, modules: dict[str, tuple[str, ...]], namespace: dict) -> Callable[[str], object]:
    """A module ``__getattr__`` resolving the names of ``modules`` (module, absolute or relative to
    ``package`` -> the names it provides) on first use and caching each in ``namespace`` (the
    package's globals)."""
    names = {name: module for module, provided in modules.items() for name in provided}

    def __getattr__(name: str):
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(names[name], package), name)
        namespace[name] = value
        return value

    return __getattr__
