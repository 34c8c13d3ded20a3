"""The service's Ray Serve deployments by name, and their options: what :mod:`.app` builds and
what :mod:`.runner` starts and writes for ``serve deploy``. No Ray import here (both import it).
"""
from __future__ import annotations

from .config import ServeConfig

APP_NAME = "idemrt"
DECODER = "DecoderReplica"  # the decoder replicas' deployment (app.py's DecoderReplica)
INGRESS = "Ingress"  # the HTTP ingress's deployment (app.py's Ingress)
IMPORT_PATH = "idemrt.serve.app:app_builder"  # what ``serve deploy`` imports (app.py's app_builder)
HEAD_NODE = "node:__internal_head__"  # the resource Ray gives the head node only
UPSCALE_DELAY_S = 15.0  # sustained load this long before a replica is added
DOWNSCALE_DELAY_S = 600.0  # and this long idle before one leaves (models load slowly)


def deployment_options(config: ServeConfig) -> dict:
    """Each deployment's Serve options, by deployment name: what ``build_app`` applies and what
    ``deploy_config`` writes under the application's ``deployments:``.

    DecoderReplica: a fixed ``num_replicas``, or with ``min_replicas``/``max_replicas`` an
    ``autoscaling_config`` on ongoing requests (target: one batch, ``max_slots``, per replica);
    ``user_config`` holds the tunables a replica applies without a restart. Ingress: no CPU, on
    the head node (next to the Serve controller and the head's proxy), so losing a worker node
    never loses the requests the ingress holds."""
    actor = {"num_cpus": config.cpus_per_replica}
    if config.gpus_per_replica > 0:
        actor["num_gpus"] = config.gpus_per_replica
    decoder = {"max_ongoing_requests": config.queue + 8, "user_config": config.user_config(), "ray_actor_options": actor}
    if config.autoscaling:
        decoder["autoscaling_config"] = {
            "min_replicas": config.min_replicas, "max_replicas": config.max_replicas,
            "initial_replicas": min(max(config.replicas, config.min_replicas), config.max_replicas),
            "target_ongoing_requests": min(config.max_slots, config.queue),
            "upscale_delay_s": UPSCALE_DELAY_S, "downscale_delay_s": DOWNSCALE_DELAY_S}
    else:
        decoder["num_replicas"] = config.replicas
    ingress = {"max_ongoing_requests": 4 * config.queue,
               "ray_actor_options": {"num_cpus": 0, "resources": {HEAD_NODE: 0.001}}}
    return {DECODER: decoder, INGRESS: ingress}
