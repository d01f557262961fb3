"""The embedded reference service: a real HTTP inference service to run batchrunner against.

``url = "embedded:iris"`` in a job, ``batchrunner serve`` on the command line, and the tests
all use it. ``models`` holds the models, ``app`` the aiohttp.web application and the ways
to run it. This package is the only part of batchrunner that imports ``aiohttp.web``.
"""

from __future__ import annotations

from batchrunner.service.app import (
    DEFAULT_MAX_BODY_BYTES,
    STATS_KEY,
    GatewayError,
    RunningService,
    ServiceStats,
    create_app,
    run_service,
    serve,
    start_service,
)
from batchrunner.service.faults import FaultSettings, fault_middleware
from batchrunner.service.models import (
    MODEL_NAMES,
    FileModel,
    IrisModel,
    Model,
    ModelInputError,
    TextModel,
    load_model,
)

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "MODEL_NAMES",
    "STATS_KEY",
    "FaultSettings",
    "FileModel",
    "GatewayError",
    "IrisModel",
    "Model",
    "ModelInputError",
    "RunningService",
    "ServiceStats",
    "TextModel",
    "create_app",
    "fault_middleware",
    "load_model",
    "run_service",
    "serve",
    "start_service",
]
