"""The embedded reference service: a real HTTP inference service to run batchrunner against.

``url = "embedded:iris"`` in a job, ``batchrunner serve`` on the command line, and the tests
all use it. ``models`` holds the models (``registry`` loads them by name), ``iam`` its IAM
(login, expiring tokens), ``wire`` the routes of the other protocols (KServe v1, OIP v2,
MLflow, custom JSON), ``gateway`` what every route shares (the counts, the gateway's JSON
errors, the counting and token middlewares), ``handlers`` the inference and login
handlers, ``app`` the aiohttp.web application put together and the ways to run it. This
package is the only part of batchrunner that imports ``aiohttp.web``.
"""

from __future__ import annotations

from batchrunner.service.app import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_TOKEN_TTL_S,
    IAM_PATH,
    RunningService,
    ServiceOptions,
    create_app,
    run_service,
    serve,
    start_service,
)
from batchrunner.service.faults import FaultSettings, fault_middleware
from batchrunner.service.gateway import STATS_KEY, GatewayError, ServiceStats
from batchrunner.service.iam import IamAccount
from batchrunner.service.models import (
    FileModel,
    IrisModel,
    Model,
    ModelInputError,
    TextModel,
)
from batchrunner.service.registry import MODEL_NAMES, load_model

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_TOKEN_TTL_S",
    "IAM_PATH",
    "MODEL_NAMES",
    "STATS_KEY",
    "FaultSettings",
    "FileModel",
    "GatewayError",
    "IamAccount",
    "IrisModel",
    "Model",
    "ModelInputError",
    "RunningService",
    "ServiceOptions",
    "ServiceStats",
    "TextModel",
    "create_app",
    "fault_middleware",
    "load_model",
    "run_service",
    "serve",
    "start_service",
]
