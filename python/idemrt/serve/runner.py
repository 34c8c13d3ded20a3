"""Starting the service: an embedded local Ray instance (the default) or an existing cluster, and
the YAML that ``serve deploy`` (and KubeRay's RayService) takes."""
from __future__ import annotations

import os
from typing import Optional

from .config import ServeConfig
from .deployment import APP_NAME, IMPORT_PATH, deployment_options

# Ray's own processes stay on loopback and need no auth token for a local, single-user instance.
LOCAL_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}


def start_service(config: ServeConfig, *, host: str = "127.0.0.1", port: int = 8000, address: Optional[str] = None,
                  temp_dir: Optional[str] = None, num_cpus: Optional[int] = None):
    """Start (or join, with ``address``) Ray, start Serve's HTTP proxy on ``host:port`` and run the
    application; returns the ingress handle. Embedded instances have no dashboard."""
    import ray
    from ray import serve

    from .app import build_app

    if not ray.is_initialized():
        if address is None:
            for key, value in LOCAL_ENV.items():
                os.environ.setdefault(key, value)
            ray.init(include_dashboard=False, _temp_dir=temp_dir, num_cpus=num_cpus, log_to_driver=False)
        else:
            ray.init(address=address)
    serve.start(http_options={"host": host, "port": port}, proxy_location=config.proxy_location)
    return serve.run(build_app(config), name=APP_NAME, route_prefix="/")


def deploy_config(config: ServeConfig, *, host: str = "0.0.0.0", port: int = 8000) -> str:
    """The Serve config file (YAML) of this service for ``serve deploy`` on a cluster (and
    ``serveConfigV2`` of a KubeRay RayService). Its ``deployments:`` entries can be edited and
    redeployed in place: ``user_config`` (max_slots, queue, pixel_budget), ``num_replicas`` or
    ``autoscaling_config`` and ``max_ongoing_requests`` need no restart of a replica."""
    import yaml

    deployments = [{"name": name, **options} for name, options in deployment_options(config).items()]
    # What a request of the default speed decodes with (idemrt.DecodeConfig), derived from the
    # application's args below: a comment, so that editing the args stays the one way to change it.
    decode = config.decode_config().to_yaml() if config.perceptual else ""
    header = "".join(f"#   {line}\n" for line in decode.splitlines())
    header = f"# decode config of speed {config.speed!r} (idemrt.DecodeConfig, from args):\n{header}" if header else ""
    return header + yaml.safe_dump({
        "proxy_location": config.proxy_location,
        "http_options": {"host": host, "port": port},
        "applications": [{"name": APP_NAME, "route_prefix": "/", "import_path": IMPORT_PATH,
                          "args": config.to_dict(), "deployments": deployments}],
    }, sort_keys=False)
