"""A job's identity: what makes two runs "the same job" (a resumed run must match its
predecessor's), its short fingerprint, and the differences between two, in words."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

import orjson

from batchrunner.job.service import OpenAISettings
from batchrunner.job.settings import IMAGES, TABULAR, Job
from batchrunner.storage import InputPath, ObjectPath


def job_identity(
    job: Job, input_files: Iterable[InputPath], *, kind: str = TABULAR
) -> dict[str, Any]:
    """What makes two runs "the same job": a resumed run must match its predecessor's.

    Input identity (paths, sizes, modification times; for an image folder, the folder
    itself), URL, protocol, batch size and what decides what is sent: the columns of a
    table (``kind`` ``TABULAR``); the extensions, walk, form field and body limit of an image
    job (``IMAGES``, always one file per request). Not the token, concurrency or output
    path: those may change between runs.

    An image folder's identity does not cover each file (that would stat every file up
    front): the journal records each batch's key, and a resumed run checks them (see
    ``checkpoint``).
    """
    files = []
    for path in input_files:
        if isinstance(path, ObjectPath):  # a prefix has no size: its identity is its name
            stat = path.stat() if not path.key.endswith("/") and path.key else None
            files.append([path.uri, stat.st_size if stat else 0, stat.st_mtime_ns if stat else 0])
            continue
        local = path.stat()
        files.append([str(path.resolve()), local.st_size, local.st_mtime_ns])
    identity: dict[str, Any] = {
        "url": job.service.url,
        "protocol": job.service.protocol,
        "batch_size": 1 if kind == IMAGES else job.rows_per_request,
        "columns": list(job.input.columns) if job.input.columns is not None else None,
        "id_column": job.input.id_column,
        "format": job.input.format,
        "files": files,
    }
    if job.input.encoding != "utf-8":  # only when set: other runs' identities stay the same
        identity["encoding"] = job.input.encoding
    if job.input.binary != "refuse":
        identity["binary"] = job.input.binary
    if job.output.result_fields is not None:  # what the output holds
        identity["result_fields"] = list(job.output.result_fields)
    if job.service.protocol != "modelarts":  # what the body looks like decides the results
        identity["wire"] = job.service.model_dump(
            mode="json",
            include={
                "json_settings": True,
                "kserve": True,
                "oip": True,
                "openai": set(OpenAISettings.IDENTITY),
            },
            exclude_none=True,
        )
    if kind == IMAGES:
        extensions = job.input.extensions
        identity["images"] = {
            "extensions": list(extensions) if extensions is not None else None,
            "recursive": job.input.recursive,
            "follow_links": job.input.follow_links,
            "file_field": job.service.file_field,
            # It decides which files are sent and which become error rows unsent.
            "max_request_bytes": job.batch.max_request_bytes,
        }
    return identity


def fingerprint(identity: Mapping[str, Any]) -> str:
    """A short stable hash of a job identity (see ``job_identity``)."""
    return hashlib.sha256(orjson.dumps(identity, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


#: The key a resumable run adds to its identity when ``input.incremental`` is on: which
#: remembered items filtered its batches. Not part of ``job_identity`` (nor of the job's
#: fingerprint): the remembered items change every night, the job does not.
INCREMENTAL_IDENTITY = "incremental"


def identity_changes(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    """What differs between two identities, in words: ``batch_size: 50 -> 20``."""
    changes = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if old == new:
            continue
        if key == "files":
            changes.append("the input files changed (names, sizes or modification times)")
        elif key == INCREMENTAL_IDENTITY:
            changes.append("input.incremental, or the items it remembers, changed")
        elif isinstance(old, Mapping) and isinstance(new, Mapping):  # a section: images
            changes.extend(f"{key}.{change}" for change in identity_changes(old, new))
        else:
            changes.append(f"{key}: {old!r} -> {new!r}")
    return changes
