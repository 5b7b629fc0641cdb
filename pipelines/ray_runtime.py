"""Starting or joining Ray, the same way for every stage.

``address=None`` and no ``RAY_ADDRESS`` in the environment: a local Ray on this machine
(``num_cpus`` caps it; the dashboard is off because a laptop run does not need it).
``address="auto"``, ``ray://...`` or ``RAY_ADDRESS`` (set by Ray Jobs): join that cluster, whose
size is the cluster's business, so ``num_cpus`` is ignored there.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Idempotent ``ray.init``: a running Ray in this process is reused as it is."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)

