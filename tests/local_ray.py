"""One local Ray instance with Serve's HTTP proxy on loopback, for a test module's service fixture."""
import contextlib
import os
import socket

from idemrt.serve.runner import LOCAL_ENV


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_serve(tmp):
    """Start Ray (loopback only, no dashboard, no memory monitor, files under ``tmp``) and Serve's
    proxy on a free loopback port; yields the base URL; shuts both down."""
    import ray
    from ray import serve

    os.environ.update(LOCAL_ENV, RAY_memory_monitor_refresh_ms="0")
    ray.init(include_dashboard=False, _temp_dir=str(tmp / "ray"), num_cpus=2, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
