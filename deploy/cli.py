"""`repic serve`: run the captioning service, or manage its users and keys.

    repic serve --checkpoint DIR [--adapter DIR] [--config deploy/serve.yaml]
                [--host 127.0.0.1] [--port 8000] [--engine vllm|hf] [--captioner.max_new_tokens 32 ...]
    repic serve add-user NAME [--admin] [--config ...]   prints the new user's API key
    repic serve add-key NAME [--config ...]              prints another key for NAME

`--config` is a Ray Serve YAML (deploy/serve.yaml): the application's `args` are
ServeConfig fields, `deployments` the per-deployment options, `http_options` the
bind address. Dotted overrides (`--store.database_url postgresql://...`) apply on
top. Ray is imported only to run the service (from `deploy.serve_app`).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from repic_ray.config import ConfigError, deep_merge, from_dict, load_yaml, parse_overrides
from repic_ray.serving.config import ServeConfig
from repic_ray.serving.store import ConceptStore, StoreError


def read_serve_yaml(path: str | None) -> tuple[dict, dict[str, dict], dict]:
    """(application args, deployment options by name, http_options) of a Serve YAML."""
    if not path:
        return {}, {}, {}
    data = load_yaml(path)
    apps = data.get("applications") or []
    if len(apps) != 1:
        raise ConfigError(f"{path}: expected exactly one application, found {len(apps)}")
    app = apps[0]
    deployments: dict[str, dict] = {}
    for i, dep in enumerate(app.get("deployments") or []):
        if "name" not in dep:
            raise ConfigError(f"{path}: applications[0].deployments[{i}] has no name")
        deployments[dep["name"]] = {k: v for k, v in dep.items() if k != "name"}
    return dict(app.get("args") or {}), deployments, dict(data.get("http_options") or {})


def _config(args: argparse.Namespace, rest: list[str]) -> tuple[ServeConfig, dict, dict]:
    app_args, deployments, http = read_serve_yaml(args.config)
    if getattr(args, "checkpoint", None):
        app_args = deep_merge(app_args, {"captioner": {"checkpoint": args.checkpoint}})
    if getattr(args, "adapter", None):
        app_args = deep_merge(app_args, {"captioner": {"adapter": args.adapter}})
    if getattr(args, "engine", None):
        app_args["engine"] = args.engine
    if rest:
        app_args = deep_merge(app_args, parse_overrides(rest))
    try:
        cfg = from_dict(ServeConfig, app_args)
    except ConfigError as exc:
        raise ConfigError(f"{args.config or 'arguments'}: {exc}") from None
    return cfg, deployments, http


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="repic serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="Ray Serve YAML (e.g. deploy/serve.yaml)")
    p.add_argument("--checkpoint", help="Qwen2.5-VL checkpoint dir or tiny:qwen2.5-vl")
    p.add_argument("--adapter", help="LoRA adapter dir")
    p.add_argument("--engine", choices=["vllm", "hf"])
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (default 8000)")
    return p


def _manage(command: str, argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog=f"repic serve {command}")
    p.add_argument("name")
    p.add_argument("--config")
    if command == "add-user":
        p.add_argument("--admin", action="store_true", help="may create users and keys")
    args, rest = p.parse_known_args(argv)
    cfg, _, _ = _config(args, rest)
    store = ConceptStore(cfg.store)
    try:
        if command == "add-user":
            store.create_user(args.name, is_admin=args.admin)
        key = store.create_api_key(args.name)
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    print(key)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "serve":  # tolerate being handed the subcommand too
        argv = argv[1:]
    if argv and argv[0] in ("add-user", "add-key"):
        return _manage(argv[0], argv[1:])
    args, rest = _parser().parse_known_args(argv)
    cfg, deployments, http = _config(args, rest)
    http = {"host": "127.0.0.1", "port": 8000, **http}
    if args.host:
        http["host"] = args.host
    if args.port:
        http["port"] = args.port
    run(cfg, deployments, http)
    return 0


def run(cfg: ServeConfig, deployments: dict[str, dict[str, Any]], http: dict[str, Any]) -> None:
    """Start Serve with the application and block until interrupted."""
    import ray
    from ray import serve

    # Make `deploy` importable by the replicas when running from a checkout.
    repo = str(Path(__file__).resolve().parents[1])
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (repo, os.environ.get("PYTHONPATH")) if p)
    from deploy.serve_app import application

    ray.init(address=os.environ.get("RAY_ADDRESS", "local"), include_dashboard=False)
    # SIGTERM (a service manager's stop, `kill`) takes the same path as Ctrl-C, so Serve
    # and the local Ray cluster this process started shut down in order. Set after
    # `ray.init`, which installs its own handler (kill the node's processes, exit 1).
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        serve.start(http_options=http)
        try:
            serve.run(application(cfg, deployments), name="repic", route_prefix="/")
        except RuntimeError as exc:  # a deployment failed (e.g. the caption engine)
            raise SystemExit(f"repic serve: the service did not start: {exc}") from None
        print(f"repic serve: listening on http://{http['host']}:{http['port']}/ "
              f"(API docs at /docs); Ctrl-C to stop", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        serve.shutdown()
        ray.shutdown()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
