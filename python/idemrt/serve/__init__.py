"""``idemrt serve``: a decode service on Ray Serve with step-level continuous batching (docs/serving.md).

    idemrt serve --unet ffhq_10m.pt --preset ffhq256 --codec bmshj2018-hyperprior --codec-checkpoint F
    curl --data-binary @photo.idm 'http://127.0.0.1:8000/v1/decode?seed=0' -o photo.png

Names are imported on first use: the command line and :class:`Client` do not import Ray.
"""
from idemrt.lazy import lazy_getattr

_LAZY = {  # module -> the names it provides
    ".client": ("Client", "DecodeResult", "ServiceError"),
    ".config": ("ServeConfig",),
    ".engine": ("DecodeEngine",),
    ".app": ("build_app", "app_builder"),
    ".runner": ("start_service", "deploy_config"),
}

__all__ = sorted(name for names in _LAZY.values() for name in names)

__getattr__ = lazy_getattr(__name__, _LAZY, globals())
