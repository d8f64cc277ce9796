"""``asyncfl serve``, ``asyncfl client`` and ``asyncfl status``: the service from the shell.

Logging is configured here, never in the library: the service logs structured records
(``extra`` fields) and these commands print them as one JSON object per line on stderr.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any, cast

import typer

__all__ = ["client", "serve", "status"]

_STD_ATTRS = set(vars(logging.makeLogRecord({})))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update({k: v for k, v in vars(record).items() if k not in _STD_ATTRS})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def _json_logs(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("asyncfl.service")
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False


def _parse_ids(spec: str) -> list[int]:
    """``3``, ``0-9`` or ``1,4,7-9`` -> client ids."""
    ids: list[int] = []
    try:
        for part in spec.split(","):
            lo, sep, hi = part.partition("-")
            ids.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
    except ValueError as exc:
        raise typer.BadParameter(f"client ids {spec!r}: use e.g. 3, 0-9 or 1,4,7-9") from exc
    return ids


def serve(
    config: Annotated[Path, typer.Argument(help="Service YAML config (see docs/service.md).")],
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config field: key.sub=value (repeatable)."),
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning.")] = "info",
    role: Annotated[
        str,
        typer.Option(
            help="all (one process), or one role of a split server: coordinator, selector, "
            "aggregator (addresses in the config's `roles` section)."
        ),
    ] = "all",
    aggregator_id: Annotated[
        str | None,
        typer.Option("--id", help="--role aggregator: which of roles.aggregators this is."),
    ] = None,
) -> None:
    """Run the federated learning server (selector, aggregator and coordinator roles)."""
    from asyncfl.cli.main import load_config_data
    from asyncfl.core.configload import build_config
    from asyncfl.service.config import ServiceConfig
    from asyncfl.service.roles import Role, run_role

    roles = ("all", "coordinator", "selector", "aggregator")
    if role not in roles:
        raise typer.BadParameter(f"--role {role!r}: one of {', '.join(roles)}")
    cfg = build_config(ServiceConfig, load_config_data(config, set_ or []))
    if aggregator_id is not None:
        if role != "aggregator":
            raise typer.BadParameter("--id names an aggregator: use it with --role aggregator")
        known = [a.id for a in cfg.roles.aggregators]
        if aggregator_id not in known:
            raise typer.BadParameter(f"--id {aggregator_id!r}: roles.aggregators has {known}")
    elif role == "aggregator" and len(cfg.roles.aggregators) != 1:
        known = [a.id for a in cfg.roles.aggregators]
        raise typer.BadParameter(f"several aggregators are configured ({known}): give --id")
    _json_logs(log_level)
    run_role(cfg, cast("Role", role), aggregator_id)  # checked against `roles` above


def tee_trust(
    config: Annotated[Path, typer.Argument(help="Service YAML config (see docs/service.md).")],
    task: Annotated[str, typer.Option(help="The tee task's id.")],
) -> None:
    """Print what a device must trust for a tee task: vendor public key and measurement (hex).

    Run it where the server's storage is (it creates the simulated vendor key if absent) and
    give both values to the devices (`asyncfl client --tee-vendor-public ... --tee-measurement
    ...`); a device never takes them from the server it is about to trust.
    """
    from asyncfl.cli.main import load_config_data
    from asyncfl.core.configload import build_config
    from asyncfl.service.config import ServiceConfig
    from asyncfl.service.task import initial_params
    from asyncfl.service.tee import expected_measurement_for, load_vendor, vendor_key_path

    cfg = build_config(ServiceConfig, load_config_data(config, []))
    match = [t for t in cfg.tasks if t.id == task]
    if not match:
        raise typer.BadParameter(f"no task {task!r}; tasks: {[t.id for t in cfg.tasks]}")
    t = match[0]
    if t.secure_aggregation.mode != "tee":
        raise typer.BadParameter(
            f"task {task!r} has secure_aggregation.mode {t.secure_aggregation.mode!r}"
        )
    vendor = load_vendor(vendor_key_path(t, Path(cfg.storage.dir)))
    dim = int(initial_params(t).shape[0])
    typer.echo(f"tee_vendor_public: {vendor.public.hex()}")
    typer.echo(f"tee_measurement: {expected_measurement_for(t, dim).hex()}")


def client(
    server: Annotated[str, typer.Option(help="host:port of the server.")],
    client_ids: Annotated[str, typer.Option("--clients", help="Client ids: 3, 0-9, 1,4,7-9.")],
    data_config: Annotated[
        Path,
        typer.Option(help="YAML with `seed` and a `data` section (a simulation config works)."),
    ],
    token: Annotated[str | None, typer.Option(help="Bearer token (one client).")] = None,
    secret_file: Annotated[
        Path | None,
        typer.Option(help="Derive each client's token from the server secret (testing only)."),
    ] = None,
    ca_cert: Annotated[Path | None, typer.Option(help="PEM root certificate to trust.")] = None,
    insecure: Annotated[bool, typer.Option(help="Plaintext (loopback servers only).")] = False,
    max_updates: Annotated[int | None, typer.Option(help="Stop after this many.")] = None,
    task_id: Annotated[str, typer.Option(help="Join only this task.")] = "",
    report: Annotated[Path | None, typer.Option(help="Write every upload as JSON lines.")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning.")] = "warning",
    tee_vendor_public: Annotated[
        str | None,
        typer.Option(help="tee tasks: the vendor's Ed25519 public key (hex; `asyncfl tee-trust`)."),
    ] = None,
    tee_measurement: Annotated[
        str | None,
        typer.Option(
            help="tee tasks: the enclave measurement to accept (hex; `asyncfl tee-trust`)."
        ),
    ] = None,
) -> None:
    """Run one or several device clients: check in, train on local data, upload, repeat."""
    import torch
    import yaml

    from asyncfl.core.configload import build_config
    from asyncfl.data.registry import DataConfig, load_dataset
    from asyncfl.service.auth import Secret
    from asyncfl.service.client import ClientOptions, TorchTrainer, Trainer, run_clients_async
    from asyncfl.service.config import is_loopback

    _json_logs(log_level)
    torch.set_num_threads(1)  # one small batch at a time: threads only add contention
    ids = _parse_ids(client_ids)
    if (token is None) == (secret_file is None):
        raise typer.BadParameter("give exactly one of --token or --secret-file")
    if token is not None and len(ids) != 1:
        raise typer.BadParameter("--token speaks for one client; use one id in --clients")
    if ca_cert is None and not (insecure and is_loopback(server.rpartition(":")[0])):
        raise typer.BadParameter("give --ca-cert, or --insecure for a loopback server")
    trust = None
    if (tee_vendor_public is None) != (tee_measurement is None):
        raise typer.BadParameter("give both --tee-vendor-public and --tee-measurement, or neither")
    if tee_vendor_public is not None and tee_measurement is not None:
        from asyncfl.service.tee import TeeTrust

        try:
            trust = TeeTrust(bytes.fromhex(tee_vendor_public), bytes.fromhex(tee_measurement))
        except ValueError as exc:
            raise typer.BadParameter(f"tee trust values must be hex: {exc}") from exc
    raw = yaml.safe_load(data_config.read_text()) or {}
    seed = int(raw.get("seed", 0))
    data = load_dataset(build_config(DataConfig, raw.get("data", {})), seed)
    secret = Secret.from_file(secret_file) if secret_file is not None else None
    ca = ca_cert.read_bytes() if ca_cert is not None else None
    clients: list[tuple[ClientOptions, Trainer]] = []
    for c in ids:
        if not 0 <= c < data.num_clients:
            raise typer.BadParameter(f"client id {c} not in [0, {data.num_clients})")
        x, y = data.client_train(c)
        tok = token if secret is None else secret.token(str(c))
        assert tok is not None
        opts = ClientOptions(
            address=server,
            token=tok,
            client_id=c,
            num_examples=int(y.shape[0]),
            ca_cert=ca,
            task_id=task_id,
            max_updates=max_updates,
            seed=seed,
            tee=trust,
        )
        clients.append((opts, TorchTrainer(x, y, client_id=c, seed=seed)))
    reports = asyncio.run(run_clients_async(clients))
    if report is not None:
        with report.open("a") as f:
            for r in reports:
                for u in r.uploads:
                    row = {"client_id": r.client_id, **vars(u)}
                    f.write(json.dumps(row) + "\n")
    total = sum(r.accepted for r in reports)
    typer.echo(json.dumps({"clients": len(reports), "accepted": total}))


def status(
    server: Annotated[str, typer.Option(help="host:port of the server.")],
    token: Annotated[str, typer.Option(help="The operator's bearer token.")],
    ca_cert: Annotated[Path | None, typer.Option(help="PEM root certificate to trust.")] = None,
    insecure: Annotated[bool, typer.Option(help="Plaintext (loopback servers only).")] = False,
) -> None:
    """Print every task's version, concurrency and throughput (JSON)."""
    import grpc
    from google.protobuf.json_format import MessageToDict

    from asyncfl.service.auth import bearer_metadata
    from asyncfl.service.proto.asyncfl.v1 import service_pb2 as pb
    from asyncfl.service.proto.asyncfl.v1 import service_pb2_grpc as pb_grpc

    if ca_cert is None and not insecure:
        raise typer.BadParameter("give --ca-cert, or --insecure for a loopback server")
    if ca_cert is not None:
        creds = grpc.ssl_channel_credentials(root_certificates=ca_cert.read_bytes())
        channel = grpc.secure_channel(server, creds)
    else:
        channel = grpc.insecure_channel(server)
    with channel:
        stub = pb_grpc.FederatedLearningStub(channel)  # type: ignore[no-untyped-call]
        try:
            resp = stub.Status(pb.StatusRequest(), metadata=bearer_metadata(token), timeout=10)
        except grpc.RpcError as exc:
            typer.echo(f"status failed: {exc.code().name}: {exc.details()}", err=True)
            raise typer.Exit(1) from exc
    typer.echo(json.dumps(MessageToDict(resp, preserving_proto_field_name=True), indent=2))
