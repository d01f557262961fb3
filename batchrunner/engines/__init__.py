"""Engines other than the local asyncio pipeline (``runner``): today, Ray Data (``ray``)."""
