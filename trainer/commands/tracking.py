"""``seqtrain tracking serve``: an MLflow tracking server for a cluster's runs.

Many jobs logging at once need a server with a real database, not one SQLite file on a shared
disk: ``--backend-store-uri postgresql://USER:PASS@HOST:PORT/DB`` (or any SQLAlchemy URI MLflow
supports) and ``--artifacts-destination`` on a path every node can read. Jobs then set
``tracking.uri=http://SERVER:PORT``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from trainer.errors import SeqtrainError


def register(sub) -> None:
    t = sub.add_parser("tracking", help="an MLflow tracking server for cluster runs")
    tsub = t.add_subparsers(dest="tracking_command", required=True)
    s = tsub.add_parser("serve", help="run an MLflow tracking server (PostgreSQL or another database)")
    s.add_argument("--backend-store-uri", required=True,
                   help="database of runs and metrics, e.g. postgresql://mlflow:PASS@dbhost:5432/mlflow")
    s.add_argument("--artifacts-destination", required=True, type=Path,
                   help="where artifacts are stored (a path every node can read, or an object store URI)")
    s.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0 for the whole cluster)")
    s.add_argument("--port", type=int, default=5000)
    s.add_argument("--workers", type=int, default=4, help="server processes")
    s.add_argument("--allowed-hosts", help="Host headers to accept when clients use the node's name "
                   "(MLflow's own option), e.g. 'mlflow-node,mlflow-node:5000'")
    t.set_defaults(run=main)


def _create_store(uri: str) -> None:
    """Open the database once, creating its tables, before the server's workers start (they
    would otherwise all run the migrations at once); one line if it cannot be reached."""
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as e:  # driver missing, database unreachable, wrong credentials
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SeqtrainError(f"--backend-store-uri {uri}: cannot open the tracking database ({first})") from None


def main(args: argparse.Namespace) -> int:
    dest = str(args.artifacts_destination)
    if "://" not in dest:
        args.artifacts_destination.mkdir(parents=True, exist_ok=True)
        dest = str(args.artifacts_destination.resolve())
    _create_store(args.backend_store_uri)
    mlflow = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow), "server", "--backend-store-uri", args.backend_store_uri,
           "--artifacts-destination", dest, "--serve-artifacts", "--host", args.host,
           "--port", str(args.port), "--workers", str(args.workers)]
    if args.allowed_hosts:
        cmd += ["--allowed-hosts", args.allowed_hosts]
    print(f"MLflow tracking server on http://{args.host}:{args.port} (runs: set tracking.uri to it)", flush=True)
    os.execv(cmd[0], cmd)  # the server replaces this process: signals reach it directly
    return 0
