"""``serve``: the embedded reference service on a port."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Annotated

import typer

from batchrunner.errors import (
    ExitCode,
    SettingError,
)

if TYPE_CHECKING:
    pass

from batchrunner.cli.common import (
    app,
    fail,
)

SERVE_TOKEN_ENV = "BATCHRUNNER_SERVE_TOKEN"


SERVE_IAM_PASSWORD_ENV = "BATCHRUNNER_SERVE_IAM_PASSWORD"


@app.command()
def serve(
    model: Annotated[
        str,
        typer.Option(
            help="The model to serve: iris, linear, sentiment or llm (text input), or "
            "colors (images)."
        ),
    ] = "iris",
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: any free one).")] = 8080,
    iam_user: Annotated[
        str | None,
        typer.Option(
            help=f"Also answer IAM logins (POST /v3/auth/tokens) of this user; "
            f"the password is read from {SERVE_IAM_PASSWORD_ENV}."
        ),
    ] = None,
    iam_domain: Annotated[
        str | None, typer.Option(help="The IAM user's domain (default: the user name).")
    ] = None,
    iam_project: Annotated[str, typer.Option(help="The IAM user's project.")] = "local",
    token_ttl: Annotated[
        float, typer.Option(min=0.001, help="Seconds an IAM token lives (the real IAM: 86400).")
    ] = 86400.0,
    latency_ms: Annotated[float, typer.Option(min=0, help="Added latency per request.")] = 0.0,
    jitter_ms: Annotated[float, typer.Option(min=0, help="Latency varies by +- this.")] = 0.0,
    capacity: Annotated[
        int | None, typer.Option(min=1, help="Requests in flight above this get 429.")
    ] = None,
    retry_after: Annotated[
        float, typer.Option(min=0, help="Retry-After (s) sent with each 429.")
    ] = 1.0,
    error_rate: Annotated[float, typer.Option(min=0, max=1, help="Share of 503s.")] = 0.0,
    drop_rate: Annotated[
        float, typer.Option(min=0, max=1, help="Share of connections dropped unanswered.")
    ] = 0.0,
    html_rate: Annotated[float, typer.Option(min=0, max=1, help="Share of HTML 502 pages.")] = 0.0,
    poison_rate: Annotated[
        float, typer.Option(min=0, max=1, help="Share of rows the model fails on (MR.0105).")
    ] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed of the fault draws.")] = 0,
    protocol: Annotated[
        str,
        typer.Option(
            help="The protocol whose URL is shown: modelarts, json, kserve-v1, oip-v2, "
            "mlflow, openai-chat or openai-embeddings (a text model answers all of them "
            "at once)."
        ),
    ] = "modelarts",
) -> None:
    """Run the embedded reference service (a real model behind the ModelArts protocol, and
    KServe v1, OIP v2, MLflow, custom JSON and OpenAI-compatible chat and embeddings
    routes for text models).

    The token is read from BATCHRUNNER_SERVE_TOKEN; if unset, a random one is made and shown.
    With --iam-user, the service also issues expiring tokens to that user (password in
    BATCHRUNNER_SERVE_IAM_PASSWORD, never on the command line) and accepts them.
    The fault options rehearse a bad day: throttling, 503s, dropped connections, HTML error
    pages, slow answers and rows the model cannot score, all drawn from --seed.
    """
    from batchrunner.service import (
        FaultSettings,
        IamAccount,
        RunningService,
        ServiceOptions,
        fault_middleware,
    )
    from batchrunner.service import serve as serve_forever

    faults = FaultSettings(
        latency_ms=latency_ms,
        jitter_ms=jitter_ms,
        capacity=capacity,
        retry_after=retry_after,
        error_rate=error_rate,
        drop_rate=drop_rate,
        html_rate=html_rate,
        poison_rate=poison_rate,
        seed=seed,
    )
    token = os.environ.get(SERVE_TOKEN_ENV, "")
    shown = token == ""
    if shown:
        import secrets

        token = secrets.token_urlsafe(24)
    account = None
    if iam_user is not None:
        password = os.environ.get(SERVE_IAM_PASSWORD_ENV, "")
        if not password:
            fail(
                SettingError(
                    f"--iam-user: set the user's password in the environment variable "
                    f"{SERVE_IAM_PASSWORD_ENV} (a password never goes on the command line)"
                )
            )
        account = IamAccount(iam_user, password, iam_domain or iam_user, iam_project)
    options = ServiceOptions(
        model=model, token=token, iam=account, token_ttl=token_ttl, protocol=protocol
    )

    def ready(service: RunningService) -> None:
        typer.echo(f"serving model {model!r} at {service.url} ({protocol})")
        if shown:
            typer.echo(f"X-Auth-Token: {token}  (a random token for this local service only)")
        else:
            typer.echo(f"X-Auth-Token: the value of {SERVE_TOKEN_ENV}")
        if account is not None:
            typer.echo(
                f"IAM: POST {service.iam_url} logs in user {account.user!r} "
                f"(domain {account.domain!r}, project {account.project!r}) with the password "
                f"in {SERVE_IAM_PASSWORD_ENV}; tokens live {token_ttl:g} s"
            )
        if faults.any:
            typer.echo(f"injecting faults: {faults}")
        typer.echo("press Ctrl-C to stop", nl=True)
        sys.stdout.flush()

    middlewares = [fault_middleware(faults)] if faults.any else []
    try:
        serve_forever(options, host, port, on_ready=ready, extra_middlewares=middlewares)
    except ValueError as error:
        fail(SettingError(f"--model/--protocol: {error}"))
    except OSError as error:
        typer.echo(f"error: cannot listen on {host}:{port}: {error.strerror}", err=True)
        raise typer.Exit(ExitCode.INVALID) from None
    except KeyboardInterrupt:
        pass
