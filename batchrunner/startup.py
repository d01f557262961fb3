"""What the command's own process leaves out before its first request.

The command line is a process of its own, and it never uses pandas or pydantic plugins on
the local engine; yet importing them would cost it more than anything else before its first
request (on a 2-core machine, pandas about 0.3 s, brought in by pyarrow the first time it
builds an array, as pyarrow looks for pandas whenever it is installed; pydantic reads every
installed package's entry points, looking for plugins, when the job model is first built).
``lean_process`` tells both not to look. It also records that dateutil is not installed,
when it is not: pyarrow's type inference (a result column whose type is not known yet)
tries to import it on every call, and each failed import searches sys.path again, about
80 us, more than converting a small batch's column. It is for the console script only: the
library API, used inside someone else's program, leaves that program's modules alone.

``arrow_pool_first`` names Arrow's memory pool before pyarrow is first imported: Arrow's C++
code (the Parquet reader and writer, IPC) allocates from the pool the environment names when
it loads, whatever pyarrow is told later; ``wiring.use_lean_memory_pool`` alone left those on
mimalloc beside jemalloc, two allocators each keeping what it freed (peak RSS about 200 MB
instead of 150 on 1,000,000 rows of wide answers).

aiohttp builds two TLS contexts when its connector module is imported, for the sessions
given none of their own; each reads the system's CA bundle (together ~45 ms on a 2-core
machine, the largest single cost before the first request). batchrunner's client gives every
session its own (``client.tls_context``, which reads the bundle only for an https URL), so
``lean_process`` has aiohttp build those two without reading it: they trust no CA, and a
session that relied on them would refuse every certificate (fail closed, never open).

``settle_heap``, also the console's only, takes what start-up made out of the cyclic garbage
collector's sight once the job is loaded. A run makes few reference cycles, but many
short-lived containers (a request's rows, an answer's items): they trigger collections, and
each full collection walked the ~70,000 objects of the imported modules again (7 of them,
0.2 s of CPU, on a run of 1,000,000 rows in batches of 1,000).
"""

from __future__ import annotations

import gc
import importlib.util
import os
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from importlib.abc import Loader


def lean_process(argv: Sequence[str]) -> None:
    """Leave pandas and pydantic's plugins out of this process (see the module docstring),
    unless the command runs on Ray (Ray Data works on pandas) or pandas is already in; mark
    dateutil absent when it is not installed."""
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    if importlib.util.find_spec("dateutil") is None:
        # Marked absent, a failed import is instant (it could not be imported anyway).
        sys.modules.setdefault("dateutil", None)  # type: ignore[arg-type]
    if "aiohttp.connector" not in sys.modules:
        sys.meta_path.insert(0, _UnusedTlsDefaults())
    if _on_ray(argv) or "pandas" in sys.modules:
        return
    # A finder first in line that refuses pandas: pyarrow takes the ImportError for "pandas
    # is not installed".
    sys.meta_path.insert(0, _NoPandas())


# Collections of the youngest generation: after this many more objects made than freed
# (700 by default); the older ones follow 10 such each (as by default).
GC_THRESHOLD = 10_000


ARROW_POOL_VARIABLE = "ARROW_DEFAULT_MEMORY_POOL"
LEAN_POOL = "jemalloc"  # Arrow's pool for a run, where pyarrow's wheels have it (Linux)


def arrow_pool_first() -> None:
    """Have all of Arrow allocate from the lean pool, unless the user chose a pool or
    pyarrow is already in (see the module docstring)."""
    if sys.platform.startswith("linux") and "pyarrow" not in sys.modules:
        os.environ.setdefault(ARROW_POOL_VARIABLE, LEAN_POOL)


def settle_heap() -> None:
    """Freeze the objects made so far (modules, classes, the job) out of the collector's
    sight, and collect less often (see the module docstring)."""
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 10, 10)


class _NoPandas:  # a meta path finder (importlib.abc costs 6 ms to import)
    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> ModuleSpec | None:
        if fullname == "pandas" or fullname.startswith("pandas."):
            raise ModuleNotFoundError(f"{fullname} is left out of the command's process")
        return None


class _UnusedTlsDefaults:  # a meta path finder
    """Finds ``aiohttp.connector`` as usual, and runs it with the CA bundle left unread."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> ModuleSpec | None:
        if fullname != "aiohttp.connector":
            return None
        sys.meta_path.remove(self)  # once: the real finders find it
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = cast("Loader", _WithoutCaBundle(spec.loader))
        return spec


class _WithoutCaBundle:  # a loader
    def __init__(self, loader: Loader) -> None:
        self._loader = loader

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        import ssl

        def trusting_no_ca(*args: object, **kwargs: object) -> ssl.SSLContext:
            return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)

        create, verify_paths = ssl.create_default_context, ssl.SSLContext.set_default_verify_paths
        ssl.create_default_context = trusting_no_ca
        ssl.SSLContext.set_default_verify_paths = lambda self: None  # type: ignore[method-assign]
        try:
            self._loader.exec_module(module)
        finally:
            ssl.create_default_context = create
            ssl.SSLContext.set_default_verify_paths = verify_paths  # type: ignore[method-assign]


def _on_ray(argv: Sequence[str]) -> bool:
    for position, word in enumerate(argv):
        if word == "--engine=ray" or (
            word == "--engine" and argv[position + 1 : position + 2] == ["ray"]
        ):
            return True
    return False
