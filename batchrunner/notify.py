"""Telling someone a run ended: a command given the summary, or an incoming webhook.

``[notify]`` says on which ends (``failure``, ``success``) and how: ``command`` is run with
the notification (a JSON document holding the run's summary) on its stdin; the URL in
``webhook_url_env`` is POSTed ``{"text": ..., "summary": ...}``, the shape Slack's and
Teams' incoming webhooks accept. A notifier that fails or outlasts ``timeout`` is logged and
nothing more: it never changes the run's exit code. The webhook URL is a secret (whoever
holds it can post): it is read from the environment when needed, sent only to itself (no
redirect is followed), and never shown.
"""

from __future__ import annotations

import logging
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from batchrunner.auth import MASK, Secret, scrub
from batchrunner.job.settings import NotifySettings
from batchrunner.summary import RunSummary

log = logging.getLogger("batchrunner")

SHOWN_OUTPUT_CHARS = 300  # of a failed command's stderr, in the log
EXIT_LOCKED = 75  # another run held the job's lock: this run did nothing, nothing to say


@dataclass(frozen=True, slots=True)
class RunEnd:
    """How a run ended, as a notification tells it."""

    job: str
    exit_code: int
    message: str  # one line: what happened, what to do
    summary: RunSummary | None = None  # None when the run ended before it had one

    @property
    def event(self) -> str:
        return "success" if self.exit_code == 0 else "failure"


def wants(settings: NotifySettings, end: RunEnd) -> bool:
    """Whether ``settings`` ask to be told of ``end``: failure is any exit code but 0 (and
    75, when another run held the lock and this one did nothing)."""
    return end.exit_code != EXIT_LOCKED and end.event in settings.on


def notification(end: RunEnd) -> dict[str, Any]:
    """The JSON document a command reads on its stdin."""
    return {
        "job": end.job,
        "event": end.event,
        "exit_code": end.exit_code,
        "message": end.message,
        "summary": _summary(end),
    }


def _summary(end: RunEnd) -> dict[str, Any] | None:
    return None if end.summary is None else end.summary.to_json()


def notification_text(end: RunEnd) -> str:
    """The short text a chat shows."""
    word = "succeeded" if end.event == "success" else f"FAILED (exit {end.exit_code})"
    return f"batchrunner job {end.job} {word}: {end.message}"


def send_notifications(
    settings: NotifySettings, end: RunEnd, environ: Mapping[str, str] | None = None
) -> list[str]:
    """Notify as ``settings`` say, if they want ``end``. Returns the problems (each logged
    as a warning); never raises for a notifier's failure."""
    if not wants(settings, end):
        return []
    problems = []
    if settings.command is not None:
        problem = run_command(settings.command, notification(end), settings.timeout)
        if problem is not None:
            problems.append(f"notify.command: {problem}")
    if settings.webhook_url_env is not None:
        problem = _post_to_env_webhook(settings.webhook_url_env, end, settings.timeout, environ)
        if problem is not None:
            problems.append(f"notify.webhook_url_env: {problem}")
    for problem in problems:
        log.warning("%s (the run's exit code stays %d)", problem, end.exit_code)
    if not problems:
        log.info("notified: %s", end.event)
    return problems


def run_command(
    command: tuple[str, ...], document: Mapping[str, Any], timeout: float
) -> str | None:
    """Run ``command`` with ``document`` as JSON on its stdin; what went wrong, or None."""
    try:
        done = subprocess.run(
            command,
            input=orjson.dumps(document, default=str),
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"{command[0]} did not finish within {timeout:g} s; it was stopped"
    except OSError as exc:
        return f"cannot run {command[0]}: {exc.strerror or exc}"
    if done.returncode != 0:
        said = done.stderr.decode("utf-8", "replace").strip()[:SHOWN_OUTPUT_CHARS]
        return f"{command[0]} failed with exit code {done.returncode}" + (
            f": {said}" if said else ""
        )
    return None


def _post_to_env_webhook(
    name: str, end: RunEnd, timeout: float, environ: Mapping[str, str] | None
) -> str | None:
    value = (os.environ if environ is None else environ).get(name, "").strip()
    if not value:
        return f"environment variable {name} is not set or empty: export the webhook URL as {name}"
    return post_webhook(Secret(value), end, timeout)


def post_webhook(url: Secret, end: RunEnd, timeout: float) -> str | None:
    """POST the short text and the summary to the webhook at ``url``; what went wrong (with
    the URL masked), or None."""
    address = url.reveal()
    if not address.lower().startswith(("https://", "http://")):
        return "the webhook URL must start with https:// (or http://)"
    body = orjson.dumps({"text": notification_text(end), "summary": _summary(end)}, default=str)
    request = urllib.request.Request(
        address,
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", "User-Agent": "batchrunner"},
    )
    opener = urllib.request.build_opener(_NoRedirects())
    try:
        with opener.open(request, timeout=timeout) as answer:
            answer.read(64 * 1024)
    except urllib.error.HTTPError as exc:
        return f"the webhook answered HTTP {exc.code}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, TimeoutError) or "timed out" in str(reason):
            return f"the webhook did not answer within {timeout:g} s"
        return f"cannot reach the webhook: {_masked(str(reason), url)}"
    return None


def _masked(text: str, url: Secret) -> str:
    # The whole URL and its path (where Slack and Teams put the key) never show.
    text = scrub(text, url)
    path = url.reveal().split("://", 1)[-1].partition("/")[2]
    return text.replace(path, MASK) if path else text


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer, not an order: the summary goes to the URL given, or nowhere."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None
