"""The local engine: the asyncio pipeline in this process (``batchrunner run``).

    runner      a run's life: checks, lock and state, the pipeline, the output committed
    control     what steers a run while it goes: signals, the grace period, progress
    reading     the reading stage: the input, batch by batch, counted and fingerprinted
    finishing   the finishing stage: finished batches journaled and counted

The dispatch stage between reading and finishing is ``batchrunner.dispatch``'s
``Dispatcher``, which the Ray engine uses too.
"""

from batchrunner.engines.local.runner import Runner, run_job

__all__ = ["Runner", "run_job"]
