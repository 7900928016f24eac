"""Command line: ``petsage-grpc serve``, ``probe``, ``status`` and ``fleet``.

Kept free of grpc imports at module level: ``probe`` runs as a Kubernetes exec probe
and must start fast, and ``serve`` should report a bad flag before loading anything.

Exit codes of ``serve``: 0 stopped cleanly after a signal; 1 stopped by an unexpected
error (logged); 2 bad flag, bad environment variable, bad configuration file or cannot
listen (the problem on stderr, nothing left running). ``probe`` exits as
grpc_health_probe does (see ``petsage_grpc.cli._probe``).

Every line ``serve`` writes to stderr follows the log format, errors before the server
runs included. The format is taken, as soon as it can be known, from the first valid
one of: the ``--log-format`` flag, ``PETSAGE_GRPC_LOG_FORMAT``, the configuration
file's ``[server] log_format`` (once the file has been read), ``text``. A flag that
cannot be read (a bad value, a missing one, an ambiguous abbreviation) counts as not
given: its error is reported in the format the environment asks for.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from petsage_grpc.cli._version import installed_version

if TYPE_CHECKING:
    from petsage_grpc.server._config import Config
    from petsage_grpc.server._server import ServeOptions

__all__ = ["main"]

PROG = "petsage-grpc"
EXIT_CRASHED = 1


def _serve(argv: Sequence[str], environ: Mapping[str, str]) -> int:
    import signal  # noqa: PLC0415 - argparse, signal: not on the probe's path

    from petsage_grpc.cli._parsing import (  # noqa: PLC0415
        EXIT_USAGE,
        LOG_FORMAT_ENV,
        Parser,
        argparse_type,
        early_log_format,
        error_line,
        valid_format,
    )

    # Until the server installs its handler, a SIGHUP (reload) must not end the process.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from petsage_grpc.server._settings import (  # noqa: PLC0415
        ENV_PREFIX,
        SERVER_SETTINGS,
        SettingError,
        resolve_settings,
    )

    parser = Parser(
        prog=f"{PROG} serve",
        description="Serve grpc.health.v1.Health, petsage.v1.SmokeTestService and reflection.",
        epilog=f"Every option can also be set as an environment variable {ENV_PREFIX}<NAME>, "
        f"e.g. {ENV_PREFIX}PORT=50052, and (except --config) in the configuration file's "
        "[server] table. Flags win over the environment, which wins over the file.",
    )
    for setting in SERVER_SETTINGS:
        parser.add_argument(
            setting.flag, dest=setting.name, type=argparse_type(setting.convert), help=setting.help
        )
    parser.log_format = early_log_format(argv, environ, [s.flag for s in SERVER_SETTINGS])
    flags = vars(parser.parse_args(argv))
    try:
        early = resolve_settings(flags, environ)
    except SettingError as error:
        parser.error(str(error))
    # Flag and environment are valid now; the file may still set the format below.
    given = flags["log_format"] or valid_format(environ.get(LOG_FORMAT_ENV))
    parser.log_format = early["log_format"]
    # grpc core reads this once, when grpc is first imported: errors only (its bind and
    # TLS diagnostics); serve() logs what it wrote during start-up in the server's format
    # and silences it after, since a client can make it write a line per connection.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

    from petsage_grpc.server._config import Config, ConfigError, load_config  # noqa: PLC0415

    config = Config()
    if early["config"] is not None:
        try:
            config = load_config(early["config"])
        except ConfigError as error:
            fmt = given or valid_format(error.settings.get("log_format")) or "text"
            for problem in error.problems:
                print(error_line(problem, fmt=fmt, prog=parser.prog), file=sys.stderr)
            return EXIT_USAGE
    try:
        values = resolve_settings(flags, environ, config.server)
    except SettingError as error:
        parser.error(str(error))
    parser.log_format = values["log_format"]

    import asyncio  # noqa: PLC0415 - heavy imports only once the input is known to be good

    from petsage_grpc.server._budget import BudgetError  # noqa: PLC0415
    from petsage_grpc.server._logging import configure_logging  # noqa: PLC0415
    from petsage_grpc.server._server import ListenError, serve  # noqa: PLC0415

    try:
        options = _serve_options(values, config)
    except ValueError as error:
        parser.error(str(error))
    configure_logging(level=values["log_level"], fmt=values["log_format"])
    try:
        asyncio.run(serve(options))
    except (ListenError, BudgetError) as error:
        print(error_line(str(error), fmt=values["log_format"], prog=parser.prog), file=sys.stderr)
        return EXIT_USAGE
    except Exception:
        import logging  # noqa: PLC0415

        logging.getLogger("petsage_grpc.server").critical(
            "stopped by an unexpected error", exc_info=True
        )
        return EXIT_CRASHED
    return 0


def _serve_options(values: Mapping[str, Any], config: Config) -> ServeOptions:
    """Combine resolved settings and the file into ServeOptions.

    Raises:
        ValueError: TLS files are incomplete or unusable, the token file is unusable,
            or --http-port lacks its extra.
    """
    from petsage_grpc.server._server import ServeOptions  # noqa: PLC0415
    from petsage_grpc.services._auth import BearerToken  # noqa: PLC0415

    cert, key, client_ca = values["tls_cert"], values["tls_key"], values["tls_client_ca"]
    if (cert is None) != (key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    if client_ca is not None and cert is None:
        raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
    if values["shed_lag_seconds"] is not None and (
        values["probe_port"] is None and values["http_port"] is None
    ):
        raise ValueError("--shed-lag-seconds needs --probe-port or --http-port")
    if values["http_port"] is not None:
        from petsage_grpc._extras import missing_extra  # noqa: PLC0415

        missing = missing_extra("http", feature="--http-port")
        if missing is not None:
            raise ValueError(missing)
    tls = None
    if cert is not None:
        from petsage_grpc.server._tls import TlsFiles  # noqa: PLC0415

        tls = TlsFiles(cert=cert, key=key, client_ca=client_ca)
    token = config.auth_token
    if values["auth_token_file"] is not None:
        token = BearerToken.read_file(values["auth_token_file"])
    return ServeOptions(
        host=values["host"],
        port=values["port"],
        drain_seconds=values["drain_seconds"],
        grace_seconds=values["grace_seconds"],
        http_port=values["http_port"],
        probe_port=values["probe_port"],
        loop_stall_seconds=values["loop_stall_seconds"],
        shed_lag_seconds=values["shed_lag_seconds"],
        tls=tls,
        auth_token=token,
        protect_reflection=config.protect_reflection,
        memory_budget_mib=values["memory_budget"],
        max_watch_streams=values["max_watch_streams"],
        max_watch_streams_per_connection=values["max_watch_streams_per_connection"],
        max_connections_per_address=values["max_connections_per_address"],
        shed_connections=values["shed_connections"],
        http_access_log=values["http_access_log"],
        checks=config.checks,
        report_checks=config.report_checks,
        config_path=values["config"],
        config_poll_seconds=values["config_poll_seconds"],
    )


def main(argv: Sequence[str] | None = None, *, environ: Mapping[str, str] | None = None) -> int:
    """Run the command line with *argv* (default: ``sys.argv[1:]``) and return the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    environ = os.environ if environ is None else environ
    if args and args[0] == "probe":
        from petsage_grpc.cli._probe import run_probe  # noqa: PLC0415

        return run_probe(args[1:])
    if args and args[0] == "status":
        from petsage_grpc.cli._status_command import run_status  # noqa: PLC0415

        return run_status(args[1:])
    if args and args[0] == "fleet":
        from petsage_grpc.cli._fleet_command import run_fleet  # noqa: PLC0415

        return run_fleet(args[1:])
    from petsage_grpc.cli._parsing import EXIT_USAGE, LOG_FORMAT_ENV, Parser, valid_format  # noqa: PLC0415

    parser = Parser(
        prog=PROG,
        description="The PetSage gRPC health service.",
        epilog=f"Run '{PROG} COMMAND --help' (probe: '-help') for a command's options.",
    )
    parser.add_argument(
        "command",
        choices=("serve", "probe", "status", "fleet"),
        help="serve; probe a server as grpc_health_probe does; show a server's status "
        "(or a fleet's: status --discover); serve a fleet page",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.log_format = valid_format(environ.get(LOG_FORMAT_ENV)) or "text"
    if args == ["--version"]:
        print(f"{PROG} {installed_version()}")
        return 0
    if not args or args[0] != "serve":
        parser.parse_args(args)  # prints help, the version, or a one-line error
        return EXIT_USAGE
    return _serve(args[1:], environ)
