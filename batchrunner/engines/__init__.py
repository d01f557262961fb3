"""The engines that make a run's requests: ``local`` (the asyncio pipeline in this
process) and ``ray`` (Ray Data); both build on ``wiring`` and neither imports the other."""
