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

# Ray Train's controller drains each worker's one-slot result queue once per health check
# (2 s by default), so every ray.train.report waited up to 2 s: with short epochs (tests, small
# stores, GPUs) training ran at one epoch per 2 s. Polling every 0.25 s costs one small RPC per
# worker; set on the local Ray here and in the runtime env of submitted jobs (pipelines/submit.py),
# unless the environment sets it.
TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")}


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
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True,
                 runtime_env={"worker_process_setup_hook": quiet_state_api_pollers,
                              "env_vars": dict(TRAIN_ENV)})


# Ray Train's placement-group cleaner asks the state API, which the dashboard serves, whether the
# controller is alive once a second, and warns on every failed query: without a dashboard (local
# Ray above) that is a warning per second of training and nothing else.
_STATE_API_POLLERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)


def quiet_state_api_pollers() -> None:
    """``worker_process_setup_hook`` of the local Ray: errors only from :data:`_STATE_API_POLLERS`."""
    for name in _STATE_API_POLLERS:
        logging.getLogger(name).setLevel(logging.ERROR)

