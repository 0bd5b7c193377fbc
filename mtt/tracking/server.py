"""The team tracking server (``make mlflow-server``): ``mlflow server`` with a database backend
store and a served artifact root, optionally behind MLflow's own login.

    python -m mtt.server --db URI --artifacts DIR [--host H] [--port P] [--auth basic]

``--auth basic`` runs MLflow's ``basic-auth`` app: every request but ``/health`` needs a user
name and password (clients set ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``).
Users, passwords and permissions live in their own database (``--auth-db``, beside the
server's files); the admin user is created on the first start from ``MLFLOW_AUTH_ADMIN_PASSWORD``
(MLflow refuses to start without it). The Flask secret that signs the UI's forms is
``MLFLOW_FLASK_SERVER_SECRET_KEY``, or one generated once into ``<state>/flask_secret_key``.

Binding an address other than loopback without ``--auth`` prints a warning: anyone who can
reach the port can then create, change and delete runs.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import secrets
import sys
from pathlib import Path

from mtt.core.fs import atomic_write_bytes

AUTH_CONFIG = "basic_auth.ini"
SECRET_FILE = "flask_secret_key"


def is_loopback(host: str) -> bool:
    """``127.x.x.x``, ``::1`` or ``localhost``: reachable from this machine only."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def exposure_warning(host: str, auth: str | None) -> str | None:
    """The warning for a server anyone on the network can write to, or None."""
    if auth or is_loopback(host):
        return None
    return (
        f"warning: the MLflow server will listen on {host} without authentication: anyone who can "
        "reach this port can create, change and delete runs. Use SERVER_AUTH=basic (MLflow's login; "
        "docs/scaling-out.md) or keep SERVER_HOST=127.0.0.1 behind an SSH tunnel."
    )


def write_auth_config(state: Path, auth_db: str, permission: str) -> Path:
    """MLflow's basic-auth config (``MLFLOW_AUTH_CONFIG_PATH``), written once into ``state``.

    ``permission`` is what every signed-in user may do on experiments nobody granted otherwise:
    READ, EDIT (log runs into any experiment: a lab's shared experiments), MANAGE.
    """
    path = state / AUTH_CONFIG
    if not path.is_file():
        text = (
            "[mlflow]\n"
            f"default_permission = {permission}\n"
            f"database_uri = {auth_db}\n"
            "admin_username = admin\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        )
        atomic_write_bytes(path, text.encode())
    return path


def flask_secret(state: Path) -> str:
    """``MLFLOW_FLASK_SERVER_SECRET_KEY``, else a random one kept in ``state`` (owner-only), so a
    restarted server still accepts the forms its UI signed."""
    if os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY"):
        return os.environ["MLFLOW_FLASK_SERVER_SECRET_KEY"]
    path = state / SECRET_FILE
    if not path.is_file():
        atomic_write_bytes(path, secrets.token_hex(32).encode())
        path.chmod(0o600)
    return path.read_text().strip()


def server_command(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """The ``mlflow server`` command line and the environment it runs with."""
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        args.db,
        "--artifacts-destination",
        args.artifacts,
        "--host",
        args.host,
        "--port",
        str(args.port),
    ]
    if args.allowed_hosts:
        cmd += ["--allowed-hosts", args.allowed_hosts]
    env = dict(os.environ)
    if args.auth == "basic":
        state = Path(args.state)
        state.mkdir(parents=True, exist_ok=True)
        auth_db = args.auth_db or f"sqlite:///{(state / 'basic_auth.db').resolve()}"
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(write_auth_config(state, auth_db, args.auth_permission))
        env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = flask_secret(state)
        cmd += ["--app-name", "basic-auth"]
    return cmd, env


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mtt.server", description=__doc__.split("\n\n")[0])
    p.add_argument("--db", required=True, help="backend store URI (sqlite:///..., postgresql://...)")
    p.add_argument("--artifacts", required=True, help="folder or URI the server stores artifacts in")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5001)
    p.add_argument("--allowed-hosts", default="", help="Host headers to accept beyond localhost and private IPs")
    p.add_argument("--auth", choices=["none", "basic"], default="none", help="basic: MLflow's login")
    p.add_argument("--auth-db", default="", help="users and permissions store (default: <state>/basic_auth.db)")
    p.add_argument(
        "--auth-permission",
        choices=["READ", "EDIT", "MANAGE", "NO_PERMISSIONS"],
        default="EDIT",
        help="what a signed-in user may do where nobody granted otherwise (default: %(default)s)",
    )
    p.add_argument("--state", default="mlflow-server", help="folder for the auth config and secret")
    args = p.parse_args(argv)
    args.auth = None if args.auth == "none" else args.auth
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    warning = exposure_warning(args.host, args.auth)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    cmd, env = server_command(args)
    os.execve(cmd[0], cmd, env)  # the server takes this process's place (and its signals)
