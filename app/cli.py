"""The ``videorelay`` command: ``serve``, ``migrate``, ``admin``, ``simulator``; and, from a
checkout of the repository, ``bench`` and ``chaos`` (the checkout's ``tools/``, imported only
when one of them runs)."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import uvicorn
from pydantic import SecretStr, ValidationError

from app import admin
from app.auth import ApiKeys, ApiKeysError
from app.config import ConfigError, Settings
from app.logging import configure_logging
from app.migrate import DatabaseNotReady, DatabaseUnreachable, require_migrated

__all__ = ["main"]

TOOL_COMMANDS = {
    "bench": "benchmark the hot paths against baselines measured in the same run",
    "chaos": "fault-injection run: simulator with faults, replicas killed and restarted, report",
}


def _port_default() -> int:
    return int(os.environ.get("PORT", "8000"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="videorelay", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP service (and its reconciler)")
    serve.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    serve.add_argument("--port", type=int, default=_port_default(), help="default: $PORT or 8000")
    serve.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    serve.add_argument(
        "--simulate",
        action="store_true",
        help="embed the hiapi simulator at /simulator and point the service at it (no key needed)",
    )
    serve.add_argument(
        "--migrate",
        action="store_true",
        help="apply database migrations before starting (without it, an unmigrated database "
        "is refused)",
    )
    serve.add_argument(
        "--forwarded-allow-ips",
        default="127.0.0.1",
        metavar="IPS",
        help="comma-separated addresses or networks of the proxies whose X-Forwarded-For and "
        "X-Forwarded-Proto are believed, or '*' when nothing but the proxy reaches this port "
        "(default 127.0.0.1)",
    )
    serve.add_argument(
        "--fetch-images",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="with --simulate: let the simulator download remote image URLs (default: it "
        "renders a generated frame and reaches no host outside this process)",
    )
    serve.add_argument(
        "--render-scale",
        type=_render_scale,
        default=None,
        help="with --simulate: size of the simulator's clips as a share of hiapi's (0 < S <= 1; "
        "default 1: 720p clips are 720 px high, 1080p clips 1080 px)",
    )

    sub.add_parser("migrate", help="apply database migrations (alembic upgrade head)")
    admin.add_parser(sub)

    sim = sub.add_parser("simulator", help="run a standalone fake hiapi")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=9100)
    sim.add_argument("--public-base-url", default=None, help="default: http://HOST:PORT")
    sim.add_argument("--api-key", default=None, help="require this bearer key (default: any sk-*)")
    sim.add_argument("--latency", type=float, default=1.0, help="seconds to 'render' a clip")
    sim.add_argument("--fail-rate", type=float, default=0.0, help="share of tasks that fail")
    sim.add_argument("--error-5xx-rate", type=float, default=0.0, help="share of 503 answers")
    sim.add_argument("--create-timeout-rate", type=float, default=0.0)
    sim.add_argument("--drop-rate", type=float, default=0.0, help="share of callbacks never sent")
    sim.add_argument("--duplicate-rate", type=float, default=0.0, help="share sent 2-3 times")
    sim.add_argument("--url-ttl", type=float, default=3600.0, help="seconds an output URL lives")
    sim.add_argument("--pad-bytes", type=int, default=0, help="grow each MP4 by this many bytes")
    sim.add_argument(
        "--render-scale",
        type=_render_scale,
        default=1.0,
        help="clip size as a share of hiapi's (0 < S <= 1; default 1: 720p clips are 720 px "
        "high; 0.1 makes them 72 px)",
    )
    sim.add_argument(
        "--broken-clip",
        default=None,
        metavar="KIND",
        help="every task succeeds with this kind of broken MP4: truncated, no_moov, moov_at_end, "
        "wrong_duration or no_video_stream (default: valid clips; PATCH /_sim/config changes it)",
    )
    sim.add_argument(
        "--fetch-images",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="download each task's image URL and render from it (default: a generated frame, "
        "no outbound request)",
    )
    sim.add_argument("--seed", type=int, default=None)

    # Their options are parsed by the tool itself (``main`` hands it the rest of the line).
    for command, text in TOOL_COMMANDS.items():
        sub.add_parser(command, help=f"{text} (from a checkout of the repository)", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in TOOL_COMMANDS:
        return _tool(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "migrate":
            return _migrate(Settings())
        if args.command == "admin":
            settings = Settings()
            require_migrated(settings.DATABASE_URL, timeout=settings.DATABASE_TIMEOUT_SECONDS)
            return admin.run(args, settings)
        return _simulator(args)
    except ValidationError as exc:
        # Never echo the input: it holds HIAPI_KEY, WEBHOOK_SECRET and API_KEYS.
        for error in exc.errors(include_input=False, include_url=False):
            where = ".".join(str(p) for p in error["loc"]) or "settings"
            message = str(error["msg"]).removeprefix("Value error, ")
            print(f"videorelay: configuration error: {where}: {message}", file=sys.stderr)
        return 2
    except (ConfigError, ApiKeysError) as exc:
        print(f"videorelay: configuration error: {exc}", file=sys.stderr)
        return 2
    except DatabaseNotReady as exc:
        print(f"videorelay: {exc}", file=sys.stderr)
        return 2


def _migrate(settings: Settings) -> int:
    from app.migrate import upgrade

    configure_logging(settings.LOG_LEVEL, settings.LOG_FORMAT)
    upgrade(settings.DATABASE_URL)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from app.main import create_app

    settings = Settings()
    configure_logging(settings.LOG_LEVEL, settings.LOG_FORMAT)
    ApiKeys.load(settings.API_KEYS.get_secret_value(), settings.API_KEYS_FILE)  # fail early
    if settings.METRICS_PORT is not None and settings.METRICS_PORT == args.port:
        raise ConfigError(
            f"METRICS_PORT is {args.port}, the port the API listens on; give /metrics another "
            "port (one only your Prometheus can reach), or unset METRICS_PORT"
        )
    if settings.METRICS_PORT is not None:
        from app.metrics import metrics_port_problem

        problem = metrics_port_problem(args.host, settings.METRICS_PORT)
        if problem:
            raise ConfigError(f"{problem}: choose a free port, or unset METRICS_PORT")
    if args.simulate:
        return _serve_simulated(args, settings)
    for flag, value in (
        ("--fetch-images", args.fetch_images),
        ("--render-scale", args.render_scale),
    ):
        if value:
            raise ConfigError(f"{flag} goes with --simulate (it is a simulator setting)")
    settings.require_production_secrets()
    settings.require_reachable_callbacks()
    if args.migrate:
        _migrate(settings)
    else:
        try:
            require_migrated(settings.DATABASE_URL, timeout=settings.DATABASE_TIMEOUT_SECONDS)
        except DatabaseUnreachable as exc:  # it may come up later: /readyz says 503 until then
            logging.getLogger("app.cli").warning("service.database_unreachable %s", exc)
    if not settings.WEBHOOK_SECRET:
        raise ConfigError("WEBHOOK_SECRET is required")
    if args.workers > 1:
        os.environ["HOST"] = args.host  # each worker binds its METRICS_PORT listener there
        uvicorn.run(
            "app.main:create_app_from_env",
            factory=True,
            host=args.host,
            port=args.port,
            workers=args.workers,
            log_config=None,
            timeout_graceful_shutdown=int(settings.SHUTDOWN_GRACE_SECONDS) + 5,
            **_proxy_options(args, settings),
        )
        return 0
    uvicorn.run(
        create_app(settings, metrics_host=args.host),
        host=args.host,
        port=args.port,
        log_config=None,
        timeout_graceful_shutdown=int(settings.SHUTDOWN_GRACE_SECONDS) + 5,
        **_proxy_options(args, settings),
    )
    return 0


def _proxy_options(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    """What uvicorn needs to sit behind a proxy: whose ``X-Forwarded-*`` to believe, and the
    path prefix (``ROOT_PATH``) the proxy strips, which uvicorn puts back in front."""
    return {
        "proxy_headers": True,
        "forwarded_allow_ips": args.forwarded_allow_ips,
        "root_path": settings.ROOT_PATH,
    }


def _serve_simulated(args: argparse.Namespace, settings: Settings) -> int:
    from app.main import create_app
    from app.simulator import SimulatorConfig, create_simulator_app

    local = f"http://127.0.0.1:{args.port}"
    settings = settings.model_copy(
        update={
            "HIAPI_KEY": SecretStr("sk-simulator"),
            "HIAPI_BASE_URL": f"{local}/simulator",
            "PUBLIC_BASE_URL": local,
            "DOWNLOAD_ALLOWED_HOSTS": f"{settings.DOWNLOAD_ALLOWED_HOSTS},{local}",
        }
    )
    if args.workers != 1:
        print("videorelay: --simulate runs one worker (the simulator keeps tasks in memory)")
    _migrate(settings)
    simulator = create_simulator_app(
        SimulatorConfig(
            public_base_url=f"{local}/simulator",
            latency_seconds=2.0,
            allow_http_image_urls=True,
            fetch_images=args.fetch_images,
            render_scale=1.0 if args.render_scale is None else args.render_scale,
            # Images uploaded to this service (the playground) are read back from it.
            local_image_prefix=f"{local}/",
        )
    )
    if not args.fetch_images:
        print(
            "videorelay: the simulator renders a generated frame for image URLs on other hosts "
            "(nothing is fetched from them); --fetch-images downloads them"
        )
    print(
        f"\nvideorelay is running with the hiapi simulator at {local}\n"
        f"  API docs:  {local}/docs\n"
        f"  try it:    curl -s -X POST {local}/v1/videos -H 'content-type: application/json' "
        '-d \'{"image_url": "https://example.com/still.jpg", "prompt": "slow zoom", '
        '"duration": 3}\'\n'
        f"  then:      curl -s {local}/v1/videos/<id>   and open  {local}/v1/videos/<id>/content\n",
        flush=True,
    )
    uvicorn.run(
        create_app(settings, simulator=simulator, metrics_host=args.host),
        host=args.host,
        port=args.port,
        log_config=None,
        timeout_graceful_shutdown=int(settings.SHUTDOWN_GRACE_SECONDS) + 5,
        **_proxy_options(args, settings),
    )
    return 0


def _simulator(args: argparse.Namespace) -> int:
    from app.simulator import SimulatorConfig, create_simulator_app

    configure_logging("INFO", _log_format())
    config = SimulatorConfig(
        api_key=args.api_key,
        public_base_url=args.public_base_url or f"http://{args.host}:{args.port}",
        latency_seconds=args.latency,
        fail_rate=args.fail_rate,
        error_5xx_rate=args.error_5xx_rate,
        create_timeout_rate=args.create_timeout_rate,
        callback_drop_rate=args.drop_rate,
        duplicate_rate=args.duplicate_rate,
        url_ttl_seconds=args.url_ttl,
        pad_bytes=args.pad_bytes,
        render_scale=args.render_scale,
        broken_clip=args.broken_clip,
        fetch_images=args.fetch_images,
        seed=args.seed,
    )
    print(f"hiapi simulator listening on {config.public_base_url}", flush=True)
    uvicorn.run(create_simulator_app(config), host=args.host, port=args.port, log_config=None)
    return 0


def _render_scale(text: str) -> float:
    """``--render-scale``: a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1:  # also false for nan
        raise argparse.ArgumentTypeError(f"must be a number above 0 and at most 1, not {text!r}")
    return value


def _log_format() -> str:
    """LOG_FORMAT for commands that need no other setting (the standalone simulator)."""
    value = os.environ.get("LOG_FORMAT", "text")
    if value not in ("text", "json"):
        raise ConfigError(f"LOG_FORMAT must be text or json, not {value!r}")
    return value


def _tool(command: str, argv: list[str]) -> int:
    """``bench`` and ``chaos``: run by ``tools/`` of a checkout, found only now."""
    try:  # by name: nothing in app/ imports tools/ (tests/test_layout.py)
        run_command = importlib.import_module("tools").run_command
    except (ImportError, AttributeError):  # an installed package, or another `tools` module
        print(
            f"videorelay {command}: this command runs from a checkout of the videorelay "
            "repository; its code is in tools/, which the installed package does not include.\n"
            "In a checkout: python3 -m venv .venv && .venv/bin/pip install -e '.[dev]' && "
            f".venv/bin/videorelay {command}   (or: make {command})",
            file=sys.stderr,
        )
        return 2
    code: int = run_command(command, argv)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
