"""A local Ray of two nodes for the tests marked ``ray`` (``local_ray``, started once).

The head node (where the test process, Ray's driver, runs) has no CPU, so every actor
and read task runs on the other node: a Ray run's work happens away from its driver, as
on a cluster. The second node has 2 CPUs, as the machine does.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest

# Where Ray logs a failed run's exception.
RAY_FAILURE_LOGGERS = ("_internal.execution.streaming_executor_state", "exceptions")


def _without_traceback(record: logging.LogRecord) -> bool:
    record.msg, record.args, record.exc_info = record.getMessage(), None, None
    return True


@pytest.fixture(scope="session")
def local_ray() -> Iterator[Any]:
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False}
    )
    try:
        cluster.add_node(num_cpus=2)
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        # pytest keeps a test's log records: Ray's record of a failed run, with its
        # traceback, would hold the run's execution, and so its actors' CPUs, until the
        # test ends (a re-run in the same test would wait for them forever). Its records
        # keep their message only.
        failing = [logging.getLogger(f"ray.data.{name}") for name in RAY_FAILURE_LOGGERS]
        for logger in failing:
            logger.addFilter(_without_traceback)
        yield ray
        for logger in failing:
            logger.removeFilter(_without_traceback)
        ray.shutdown()
    finally:
        cluster.shutdown()


def session_folder(ray: Any) -> str:
    """The folder of the running Ray session (its logs, its sockets)."""
    node = ray._private.worker.global_worker.node
    return str(node.get_session_dir_path())
