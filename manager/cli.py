"""Admin commands, run inside the manager container (``docker exec manager add-tenant ...``).

Each command is also ``manager <command>``. The CLI talks to the manager's own API,
so the API stays the one writer. ``manager serve`` runs the manager itself.
The CLI reference in docs/cli.md is generated from this parser's --help.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from pydantic import ValidationError

from manager.detail import detail_text
from manager.domain import QUOTA_DECLARED, QUOTA_FIELDS, QUOTA_KINDS, TENANT_FIELDS
from manager.errors import EngineFailed, GtmError, InvalidInput, NotFound, WaitTimedOut, exit_code_for
from manager.fields import Kind, TenantField, parse_text, parse_whole
from manager.settings import Settings, describe
from manager.sizes import format_size, parse_size


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except InvalidInput as exc:
        raise argparse.ArgumentTypeError(exc.message) from exc


def _reader(f: TenantField) -> Callable[[str], Any]:
    """The argparse type of a declared field: what it accepts and its message, from ``fields``."""

    def read(text: str) -> Any:
        try:
            # on the command line 0 lifts a quota (an option cannot say null)
            value = parse_text(f, text) if not f.quota else _quota_value(text)
        except InvalidInput as exc:
            raise argparse.ArgumentTypeError(exc.message) from exc
        return value

    read.__name__ = f.d.kind.value  # argparse names the type in "invalid size value"
    return read


def _quota_value(text: str) -> int:
    return parse_whole(text, "no limit")


SIZE_FLAGS = frozenset({"--gpu-memory", *(f.flag for f in TENANT_FIELDS if f.d.kind is Kind.SIZE)})


def _sizes_glued(argv: Sequence[str]) -> list[str]:
    """``--gpu-memory -1G`` as ``--gpu-memory=-1G``: argparse takes a value starting with '-' for an
    option and answered "expected one argument"; glued, the size's own check says what is wrong."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1] in SIZE_FLAGS and arg.startswith("-") and arg[1:2].isdigit():
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def _option(p: argparse.ArgumentParser, f: TenantField, required: bool = False, text: str = "") -> None:
    """A declared field as an option: --flag VALUE, or --flag / --no-flag for a yes-or-no one."""
    if f.d.kind is Kind.BOOL:
        p.add_argument(f.flag, dest=f.name, action=argparse.BooleanOptionalAction, help=text or f.d.help)
        return
    p.add_argument(
        f.flag,
        dest=f.name,
        type=_reader(f),
        required=required,
        metavar=f.d.metavar,
        help=text or f.d.help,
    )


def _quota_options(p: argparse.ArgumentParser, scope: str = "0: no limit") -> None:
    for f in QUOTA_DECLARED:  # --rpm-limit, --tokens-per-day, ...
        _option(p, f, text=f"{f.d.help} ({scope})")


GPU_HELP = (
    "the device, by its index in capacity or its UUID (GPU-... or MIG-...); add-tenant: default the "
    "device where it fits tightest; update-tenant: moves the tenant there (its engine restarts)"
)


NODE_HELP = (
    "on a swarm, the node (its host name or ID, as capacity lists it): the tenant goes where it fits "
    "tightest there, or on the node's own device --gpu N (its index on that node)"
)


def _device(args: argparse.Namespace) -> str | None:
    """--gpu, or with --node the API's ``<node>/<index>`` (``<node>/``: any device of the node)."""
    gpu, node = getattr(args, "gpu", None), getattr(args, "node", None)
    return gpu if node is None else f"{node}/{gpu or ''}"


def _tenant_options(p: argparse.ArgumentParser, create: bool) -> None:
    """Every declared field of a tenant (``domain.TENANT_FIELDS``), and --gpu."""
    for f in TENANT_FIELDS:
        if f.quota:
            _option(p, f, text=f"{f.d.help} (0: no limit)")
        else:
            _option(p, f, required=create and f.d.required)
        if f.name == "gpu_memory":
            p.add_argument("--gpu", help=GPU_HELP)
            p.add_argument("--node", help=NODE_HELP)


def _member_parser(
    sub: Any, command: str, text: str, name_help: str | None = None, quota_help: str | None = None
) -> None:
    """A member command: --tenant, then --name (the member) and quota options where it takes them."""
    p = sub.add_parser(command, help=text)
    p.add_argument("--tenant", required=True, help="the tenant")
    if name_help:
        p.add_argument("--name", required=True, help=name_help)
    if quota_help:
        _quota_options(p, quota_help)
        p.add_argument(
            "--weight",
            type=float,
            help="its share of the tenant's engine while members' requests wait (fair queuing), 0.1-100: 2 gets "
            "twice 1's, e.g. a PI beside students (default 1)",
        )


def _wait_options(p: argparse.ArgumentParser, text: str) -> None:
    p.add_argument("--wait", action="store_true", help=text)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds --wait waits at most (default 900)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="manager", description="gpu-tenant-manager admin commands.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("serve", help="run the manager (API, reconciler)")
    sub.add_parser("gateway", help="run a tenant gateway (started by the manager; settings GTM_GATEWAY_*)")
    agent = sub.add_parser("node-agent", help="serve this node's report to the manager (on a swarm: one on every node)")
    agent.add_argument(
        "--resources", action="store_true", help="print what this GPU node's daemon.json must advertise to Swarm"
    )
    drain = sub.add_parser(
        "drain-spool", help="print a gateway spool's records after given cursors (the manager runs it on a swarm node)"
    )
    drain.add_argument("--data-dir", type=Path, default=Path("/data"), help="the gateway's data directory")
    drain.add_argument("--cursors", default="{}", help='JSON: the manager\'s cursor per spool, {"<spool>": <cursor>}')
    _tenant_commands(sub)
    _member_commands(sub)
    _model_commands(sub)
    _host_commands(sub)
    for name, command in sub.choices.items():
        if name not in ("serve", "gateway", "node-agent", "drain-spool"):  # every admin command prints JSON on request
            command.add_argument("--json", action="store_true", help="print JSON")
    return parser


def _tenant_commands(sub: Any) -> None:
    p = sub.add_parser("add-tenant", help="admit and create a tenant; prints its API key once")
    p.add_argument("--name", required=True, help="DNS-safe tenant name, e.g. companya")
    _tenant_options(p, create=True)
    _wait_options(p, "wait until the engine serves or has failed (exit 9, with the reason)")

    p = sub.add_parser("wait-tenant", help="wait until tenants serve, showing their progress (exit 9: one failed)")
    p.add_argument("--name", action="append", required=True, help="a tenant (repeat for several)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds to wait at most for each (default 900)")

    sub.add_parser("list-tenants", help="tenants with status, reservation and measured use")

    p = sub.add_parser("update-tenant", help="resize, change engine options (engine recreated) or quotas")
    p.add_argument("--name", required=True)
    _tenant_options(p, create=False)
    _wait_options(p, "wait until the (recreated) engine serves or has failed (exit 9, with the reason)")

    p = sub.add_parser(
        "remove-tenant", help="remove a tenant's containers, network and volume; waits until they are gone"
    )
    p.add_argument("--name", required=True)
    p.add_argument(
        "--no-wait", dest="wait", action="store_false", help="return at once; the removal goes on in the background"
    )
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait at most (default 300)")

    p = sub.add_parser(
        "rotate-key",
        help="issue a new API key for a member (default: the first one); its old keys stay valid for --grace",
    )
    p.add_argument("--name", "--tenant", dest="name", required=True, help="the tenant")
    p.add_argument(
        "--member", help="the member whose key to rotate (default: the tenant's first member, named like the tenant)"
    )
    p.add_argument(
        "--grace",
        type=float,
        default=3600.0,
        help="seconds the old keys stay valid (default 3600; 0 revokes them at once)",
    )


def _member_commands(sub: Any) -> None:
    own = "the member's own limit, inside the tenant's"
    _member_parser(
        sub,
        "add-member",
        "add a member to a tenant; prints the member's API key once",
        "the member's name (the tenant name rule), e.g. alice",
        own + "; 0 or unset: bounded by the tenant's only",
    )
    _member_parser(
        sub, "list-members", "a tenant's members: keys, quotas, requests and tokens today and this month, last use"
    )
    _member_parser(sub, "update-member", "change a member's quotas (applied live)", "the member", own + "; 0 lifts it")
    _member_parser(
        sub,
        "remove-member",
        "remove a member: its keys stop working within seconds; its usage stays for cost sharing",
        "the member",
    )


def _model_commands(sub: Any) -> None:
    p = sub.add_parser("list-models", help="models in the models volume and the smallest --gpu-memory for each")
    p.add_argument("--max-model-len", type=int, help="also the smallest --gpu-memory at this context length")

    p = sub.add_parser(
        "import-model",
        help="check a model directory (or convert a GGUF file) and copy it into the models volume",
    )
    p.add_argument(
        "source",
        help="a directory or a .gguf file in the manager container (docker cp it there first), or a "
        "Hugging Face cache entry (models--org--name)",
    )
    p.add_argument("--name", help="the model's name for --model (default: the directory's or file's name)")

    p = sub.add_parser("remove-model", help="delete a model from the models volume (refused while a tenant uses it)")
    p.add_argument("model", help="the model's name, as list-models shows it")


def _host_commands(sub: Any) -> None:
    sub.add_parser("capacity", help="device memory: total, reserved and measured per tenant, free")
    sub.add_parser(
        "rotate-volume-key",
        help="rewrap every encrypted volume's key under the first key of the volume key file (put the new key "
        "first in GTM_VOLUME_KEY_FILE, run this, then drop the old line); no data is touched",
    )

    p = sub.add_parser("what-if", help="would this reservation fit? creates nothing")
    p.add_argument("--gpu-memory", type=_size, required=True)
    p.add_argument("--model")
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--name", help="an existing tenant to resize")
    p.add_argument("--gpu", help="only this device (index or UUID); default: every device")
    p.add_argument("--node", help="on a swarm, only this node's devices (or its own device --gpu N)")

    p = sub.add_parser("audit", help="the audit trail, newest first")
    p.add_argument("--name", help="only this tenant")
    p.add_argument("--action", help="only this action, e.g. add-tenant")
    p.add_argument("--limit", type=int, default=50)


class Api:
    """The manager's admin API over HTTP, as every command calls it."""

    @classmethod
    def of(cls, client: httpx.Client) -> Api:
        """Over a ready client (the tests' in-process app, its admin token in its headers)."""
        api = cls.__new__(cls)
        api.client = client
        return api

    def __init__(self, settings: Settings, transport: httpx.BaseTransport | None = None) -> None:
        from manager.wiring import admin_token_file

        token = settings.admin_token.get_secret_value() if settings.admin_token else None
        if token is None:
            path = admin_token_file(settings)
            if not path.exists():
                raise GtmError(
                    f"no admin token: set GTM_ADMIN_TOKEN or run inside the manager container (expected {path})"
                )
            token = path.read_text().strip()
        self.client = httpx.Client(
            base_url=settings.api_url, headers={"Authorization": f"Bearer {token}"}, timeout=120, transport=transport
        )

    def call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """``timeout``: seconds to wait for the answer, when longer than the client's 120 s."""
        try:
            extra: dict[str, Any] = {"timeout": timeout} if timeout else {}
            response = self.client.request(method, path, json=body, params=params, **extra)
        except httpx.HTTPError as exc:
            raise GtmError(
                f"the manager API at {self.client.base_url} did not answer ({exc}); is the manager running?"
            ) from exc
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
            except (ValueError, KeyError, TypeError):
                error = {"code": "http_error", "message": f"HTTP {response.status_code}: {response.text[:500]}"}
            err = GtmError(error["message"], details=error.get("details"))
            err.exit_code = exit_code_for(error.get("code", ""))
            raise err
        return response.json() if response.content else None


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=False)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


def _opt_size(v: int | None) -> str:
    return "-" if v is None else format_size(v)


def _print_tenants(tenants: list[dict[str, Any]]) -> None:
    rows = [
        [
            t["name"],
            str(t["port"]),
            t["model"],
            format_size(t["gpu_memory"]),
            _opt_size(t.get("measured")),
            str(t.get("concurrency") or "-"),
            str(t.get("requests_today", 0)),
            str(t.get("tokens_today", 0)),
            engine_options(t),
            t["status"],
            ("cannot wake: " + t["wake_refusal"] if t.get("wake_refusal") else t["reason"])[:60],
        ]
        for t in tenants
    ]
    # SEQS: the sequences its engine runs at once, what its reservation buys (or its --max-num-seqs)
    header = ["NAME", "PORT", "MODEL", "RESERVED", "MEASURED", "SEQS", "REQ TODAY", "TOKENS TODAY", "OPTIONS", "STATUS"]
    if any(t.get("device", "") not in ("", "host-memory") for t in tenants):  # GPU mode: where each one runs
        header.insert(3, "DEVICE")
        for row, t in zip(rows, tenants, strict=True):
            row.insert(3, t.get("device") or "first")
    if any(t.get("node") for t in tenants):  # a swarm: the node each one runs on
        header.insert(3, "NODE")
        for row, t in zip(rows, tenants, strict=True):
            row.insert(3, t.get("node") or "-")
    if any(t.get("idle_sleep_s") or t.get("sleeps") or t.get("always_on") for t in tenants):  # some sleep
        header += ["SLEEP", "LAST REQUEST (UTC)"]
        for row, t in zip(rows, tenants, strict=True):
            at = t.get("last_request_at")
            row[-1:-1] = [sleep_summary(t), time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(at)) if at else "-"]
    print(_table(rows, [*header, "REASON"]))


def _seconds(value: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if value >= size and value % size == 0:
            return f"{value / size:g}{unit}"
    return f"{value:g}s"


def sleep_summary(t: dict[str, Any]) -> str:
    """When a tenant sleeps and how its wakes went: ``after 15s, 2 sleeps, 2 wakes (last 31.2 s)``."""
    idle = t.get("idle_sleep_s")
    parts = ["always on" if t.get("always_on") else f"after {_seconds(idle)}" if idle else "never"]
    if t.get("sleeps"):
        parts.append(f"{t['sleeps']} sleeps, {t.get('wakes', 0)} wakes")
        if t.get("last_wake_s") is not None:
            parts[-1] += f" (last {t['last_wake_s']:.1f} s)"
    return ", ".join(parts)


def _print_capacity(out: dict[str, Any]) -> None:
    """One block per device: its totals, then its tenants."""
    for ledger in out.get("devices") or [{**out, "process_overhead": 0}]:
        d = ledger["device"]
        on = f" on {d.get('node_name') or d['node']}" if d.get("node") else ""  # a swarm node's device
        own = f" (its {d['kind'].upper()} {d['node_index']})" if on and d.get("node_index") is not None else ""
        where = f"{d['kind'].upper()} {d['index']} {d['uuid']}{on}{own}: " if d["kind"] != "host-memory" else ""
        where = where or (f"host memory{on}: " if on else "")
        driver = f", kept by the driver {format_size(d['reserved'])}" if d.get("reserved") else ""
        contexts = (
            f", {format_size(ledger['process_overhead'])} context per engine" if ledger["process_overhead"] else ""
        )
        room = format_size(max(ledger["unreserved"], 0))
        print(
            f"{where}{d['name']} ({out['mode']}): total {format_size(d['total'])}{driver}, free "
            f"{format_size(d['free'])}, reserved {format_size(ledger['reserved'])}{contexts}, headroom "
            f"{format_size(out['headroom'])}; a new tenant can reserve up to {room}"
        )
        rows = [
            [t["name"], format_size(t["reserved"]), "unknown" if t.get("unknown") else _opt_size(t["measured"])]
            for t in ledger["tenants"]
        ]
        print(_table(rows, ["TENANT", "RESERVED", "MEASURED"]))
    if out.get("gpu_sharing") == "mps":
        print(
            "GPU sharing: MPS, a control daemon per device; each engine capped at its reservation and "
            "context, with its reservation's share of the SMs"
        )
    enc = out.get("encrypted_volumes")
    if enc:
        print(
            f"encrypted volumes ({enc['mechanism']}): {enc['volumes']} made, default size "
            f"{format_size(enc['default_size'])}"
            if enc["available"]
            else f"encrypted volumes: unavailable: {enc['problem']}"
        )


def engine_options(t: dict[str, Any]) -> str:
    """A tenant's engine options as list-tenants shows them, each declared field by its ``listed``
    name (``max-model-len=512``, ``tools=auto``; an option on by default also when it is off); a
    field an older manager does not send is left out."""
    parts = []
    for f in TENANT_FIELDS:
        name, value = f.d.listed, t.get(f.name)
        if not name or f.name not in t:
            continue
        if f.name == "volume":
            parts += ["volume=encrypted:/data"] if value == "encrypted" else []
        elif f.name == "max_images":
            parts.append(f"images={value}x{t.get('max_image_pixels', 0) / 1e6:.1f}MP" if value else "no-images")
        elif f.d.kind is Kind.BOOL and (value or f.default is True):
            parts.append(name if value else f"no-{name}")
        elif f.d.kind is not Kind.BOOL and value:
            parts.append(f"{name}={value}")
    return ",".join(parts) or "-"


def _print_decision(d: dict[str, Any]) -> None:
    print("fits" if d["admitted"] else "does not fit: " + ", ".join(d["failed_checks"]))
    for m in d["messages"]:
        print("  " + m)


def _limit(value: int | None) -> str:
    return "-" if value is None else str(value)


def _print_members(members: list[dict[str, Any]]) -> None:
    rows = []
    for m in members:
        q = m["quotas"]
        active = [k for k in m["keys"] if k["active"]]
        rows.append(
            [
                m["name"],
                " ".join(k["prefix"] + "…" for k in active) or "-",
                " ".join(f"{_limit(q[name])}{kind.unit}" for name, kind in QUOTA_KINDS.items()),
                f"{m.get('weight', 1.0):g}",
                str(m["today"]["requests"]),
                str(m["today"]["total_tokens"]),
                str(m["month"]["requests"]),
                str(m["month"]["total_tokens"]),
                time.strftime("%Y-%m-%d %H:%M", time.gmtime(m["last_used_at"])) if m["last_used_at"] else "never",
            ]
        )
    header = ["MEMBER", "KEYS", "QUOTAS (- none)", "WEIGHT", "REQ TODAY", "TOKENS TODAY", "REQ MONTH", "TOKENS MONTH"]
    print(_table(rows, [*header, "LAST USED (UTC)"]))


def _quota_body(args: argparse.Namespace) -> dict[str, Any]:
    body = {k: getattr(args, k) for k in QUOTA_FIELDS if getattr(args, k, None) is not None}
    return {k: (None if v == 0 else v) for k, v in body.items()}  # 0 lifts the limit


def _tenant_body(args: argparse.Namespace) -> dict[str, Any]:
    """The declared fields given (and --gpu), as the API takes them."""
    keys = [f.name for f in TENANT_FIELDS if not f.quota]
    body = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    device = _device(args)
    return {**body, **({"gpu": device} if device is not None else {}), **_quota_body(args)}


POLL_S = 1.0
"""How often a waiting command asks the API again."""


def wait_for_engine(
    api: Api, name: str, timeout: float, before: dict[str, Any] | None = None, progress: bool = False
) -> dict[str, Any]:
    """Polls the tenant until its engine serves (running, or asleep: it served and its next request
    wakes it) or has failed; EngineFailed with the
    engine's own reason when it failed, WaitTimedOut when neither happened in time. ``before``:
    the tenant as the change that is waited for returned it; a failure it already showed (the
    same ``status_since``) is the old spec's, not this one's, and is waited past."""
    stale = before["status_since"] if before and before.get("status") == "failed" else None
    deadline = time.monotonic() + timeout
    started, shown = time.monotonic(), ("", "")
    while True:
        tenant: dict[str, Any] = api.call("GET", f"/api/v1/tenants/{name}")
        if progress and (tenant["status"], tenant["reason"]) != shown:  # each change once, on stderr
            shown = (tenant["status"], tenant["reason"])
            why = f" ({tenant['reason']})" if tenant["reason"] else ""
            print(f"[{time.monotonic() - started:4.0f}s] {name}: {tenant['status']}{why}", file=sys.stderr, flush=True)
        if tenant["status"] in ("running", "asleep"):  # asleep: served; its next request wakes it
            return tenant
        if tenant["status"] == "failed" and tenant["status_since"] != stale:
            raise EngineFailed(
                f"the engine of {name} failed: {tenant['reason']} (the reconciler retries with "
                "backoff; list-tenants shows the status, the console the engine's log)"
            )
        if time.monotonic() > deadline:
            raise WaitTimedOut(
                f"{name} is still {tenant['status']} after {timeout:.0f} s"
                + (f" ({tenant['reason']})" if tenant["reason"] else "")
                + "; list-tenants shows how it goes on"
            )
        time.sleep(POLL_S)


def wait_until_removed(api: Api, name: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            api.call("GET", f"/api/v1/tenants/{name}")
        except GtmError as exc:
            if exc.exit_code == NotFound.exit_code:
                return
            raise
        if time.monotonic() > deadline:
            raise WaitTimedOut(
                f"{name} is still being removed after {timeout:.0f} s; list-tenants shows it "
                "until its containers, network and volumes are gone"
            )
        time.sleep(POLL_S / 2)


class Shown:
    """Where a command's answer goes: lines for a person, or (``--json``) the answer as JSON once
    the command is done."""

    def __init__(self, as_json: bool) -> None:
        self.json = as_json

    def say(self, *lines: str) -> None:
        if not self.json:
            for line in lines:
                print(line, flush=True)


@dataclass(frozen=True)
class Outcome:
    """What a command answered, and the exit code it ends with (0 unless said)."""

    out: Any
    exit_code: int = 0


Command = Callable[[argparse.Namespace, Api, Shown], Any]
COMMANDS: dict[str, Command] = {}
"""Every admin command by name: one small function each, sharing the API client and the printer."""


def command(name: str) -> Callable[[Command], Command]:
    def register(fn: Command) -> Command:
        COMMANDS[name] = fn
        return fn

    return register


@command("add-tenant")
def _add_tenant(args: argparse.Namespace, api: Api, shown: Shown) -> Any:
    out = api.call("POST", "/api/v1/tenants", {"name": args.name, **_tenant_body(args)})
    t = out["tenant"]
    asleep = out["admission"].get("by_overcommit")
    if asleep:  # overcommit: it fits only while others sleep, so it starts asleep
        then = "(asleep: it fits only by overcommit; its first request wakes it once idle tenants sleep)"
    elif args.wait:
        then = "(waiting for its engine)"
    else:
        then = f"(status {t['status']}; the engine starts in the background)"
    shown.say(
        f"tenant {t['name']} admitted: {t['gpu_memory_human']} on port {t['port']} {then}",
        *([f"its OpenAI base URL: {t['url']}"] if t.get("url") else []),
        f"API key (shown once, store it now): {out['key']['api_key']}",
    )
    if args.wait and not asleep:
        out["tenant"] = wait_for_engine(api, args.name, args.timeout)
        shown.say(f"tenant {args.name} is running: its API serves on port {out['tenant']['port']}")
    return out


@command("wait-tenant")
def _wait_tenant(args: argparse.Namespace, api: Api, shown: Shown) -> Any:
    out = [wait_for_engine(api, name, args.timeout, progress=not shown.json) for name in args.name]
    shown.say(*(f"tenant {t['name']} is running: its API serves on port {t['port']}" for t in out))
    return out


@command("list-tenants")
def _list_tenants(args: argparse.Namespace, api: Api, shown: Shown) -> Any:
    out = api.call("GET", "/api/v1/tenants")
    if not shown.json:
        _print_tenants(out)
    return out


@command("update-tenant")
def _update_tenant(args: argparse.Namespace, api: Api, shown: Shown) -> Any:
    body = _tenant_body(args)
    if not body:
        raise InvalidInput("nothing to change: pass --gpu-memory, --port, a quota or another option")
    out = api.call("PATCH", f"/api/v1/tenants/{args.name}", body)
    if args.wait:
        out = wait_for_engine(api, args.name, args.timeout, before=out)
    if not shown.json:
        _print_tenants([out])
    return out


@command("remove-tenant")
def _remove_tenant(args: argparse.Namespace, api: Api, shown: Shown) -> Any:
    out = api.call("DELETE", f"/api/v1/tenants/{args.name}")
    if not args.wait:
        shown.say(f"tenant {args.name} is being removed (containers, network and volumes)")
        return out
    wait_until_removed(api, args.name, args.timeout)
    shown.say(f"tenant {args.name} is removed (containers, network and volumes)")
    return {"status": "removed"}


@command("rotate-key")
def _rotate_key(args: argparse.Namespace, api: Api, shown: Shown) -> Any:
    path = f"/api/v1/tenants/{args.name}" + (f"/members/{args.member}/keys" if args.member else "/keys")
    out = api.call("POST", path, {"grace_s": args.grace})
    who = f"member {args.member} of {args.name}" if args.member else args.name
    shown.say(
        f"new API key for {who} (shown once, store it now): {out['api_key']}",
        f"older keys stay valid for {args.grace:.0f} s" if args.grace else "older keys are revoked",
    )
    return out


@command("add-member")
def _add_member(args: argparse.Namespace, api: Api, shown: Shown) -> Any:
    body = {"name": args.name, **_quota_body(args), **({"weight": args.weight} if args.weight is not None else {})}
    out = api.call("POST", f"/api/v1/tenants/{args.tenant}/members", body)
    shown.say(
        f"member {args.name} added to {args.tenant}", f"API key (shown once, store it now): {out['key']['api_key']}"
    )
    return out


@command("list-members")
def _list_members(args: argparse.Namespace, api: Api, shown: Shown) -> Any:
    out = api.call("GET", f"/api/v1/tenants/{args.tenant}/members")
    if not shown.json:
        _print_members(out)
    return out


@command("update-member")
def _update_member(args: argparse.Namespace, api: Api, shown: Shown) -> Any:
    body = {**_quota_body(args), **({"weight": args.weight} if args.weight is not None else {})}
    if not body:
        raise InvalidInput(
            "nothing to change: pass --rpm-limit, --tokens-per-day, --requests-per-month, --max-in-flight or --weight"
        )
    out = api.call("PATCH", f"/api/v1/tenants/{args.tenant}/members/{args.name}", body)
    if not shown.json:
        _print_members([out])
    return out


@command("remove-member")
def _remove_member(args: argparse.Namespace, api: Api, shown: Shown) -> Any:
    api.call("DELETE", f"/api/v1/tenants/{args.tenant}/members/{args.name}")
    shown.say(f"member {args.name} removed from {args.tenant}: its keys stop working; its usage stays")
    return {"tenant": args.tenant, "member": args.name, "status": "removed"}


@command("list-models")
def _list_models(args: argparse.Namespace, api: Api, shown: Shown) -> Any:
    params = {"max_model_len": args.max_model_len} if args.max_model_len else None
    out = api.call("GET", "/api/v1/models", params=params)
    rows = [
        [m["name"], m["architecture"], f"{m['parameters'] / 1e6:.1f}M", m["dtype"],
         format_size(m["weight_bytes"]), "yes" if m["takes_images"] else "no", m["quantization"] or "-",
         format_size(m["minimum_gpu_memory"]), _opt_size(m["minimum_gpu_memory_at"]),
         format_size(m.get("engine_overhead", 0)) + (" learned" if m.get("overhead_learned") else ""),
         m.get("tool_parser") or "-", m.get("reasoning_parser") or "-", (m.get("origin") or "-")[:60],
         m["problem"][:60]]
        for m in out
    ]  # fmt: skip
    at = f"MIN AT {args.max_model_len}" if args.max_model_len else "MIN AT -"
    header = ["NAME", "ARCHITECTURE", "PARAMS", "DTYPE", "WEIGHTS", "IMAGES", "QUANT", "MIN GPU-MEMORY", at,
              "ENGINE OVERHEAD", "TOOLS (AUTO)", "REASONING (AUTO)", "ORIGIN", "PROBLEM"]  # fmt: skip
    shown.say(_table(rows, header))
    return out


@command("remove-model")
def _remove_model(args: argparse.Namespace, api: Api, shown: Shown) -> Any:
    api.call("DELETE", f"/api/v1/models/{args.model}")
    shown.say(f"model {args.model} removed from the models volume")
    return {"removed": args.model}


@command("import-model")
def _import_model(args: argparse.Namespace, api: Api, shown: Shown) -> Any:
    from manager.control.catalog import CONVERT_TIMEOUT_S

    source = os.path.abspath(args.source)  # the API runs in the same container: one filesystem
    if source.endswith(".gguf"):
        shown.say(f"converting {os.path.basename(source)} (a minute for a small model, longer for a large one)")
    body = {"source": source, **({"name": args.name} if args.name else {})}
    out = api.call("POST", "/api/v1/models", body, timeout=CONVERT_TIMEOUT_S + 60)
    shown.say(
        f"model {out['name']} imported ({out['architecture']}, {out['parameters'] / 1e6:.1f}M parameters, "
        f"images: {'yes' if out['takes_images'] else 'no'}, from {out.get('origin') or source}); smallest "
        f"--gpu-memory {format_size(out['minimum_gpu_memory'])}; use it with add-tenant --model {out['name']}"
    )
    return out


@command("capacity")
def _capacity(args: argparse.Namespace, api: Api, shown: Shown) -> Any:
    out = api.call("GET", "/api/v1/capacity")
    if not shown.json:
        _print_capacity(out)
    return out


@command("rotate-volume-key")
def _rotate_volume_key(args: argparse.Namespace, api: Api, shown: Shown) -> Any:
    out = api.call("POST", "/api/v1/volume-keys/rotate")
    done = out["rewrapped"]
    shown.say(
        f"the keys of {len(done)} encrypted volume(s) are now wrapped under key-encryption key {out['kek_id']}"
        + (f" ({', '.join(done)})" if done else ""),
        "every key is wrapped under the first key of the file: the other lines can go",
    )
    return out


@command("what-if")
def _what_if(args: argparse.Namespace, api: Api, shown: Shown) -> Outcome:
    body = {"gpu_memory": args.gpu_memory, "model": args.model, "max_model_len": args.max_model_len}
    body |= {"tenant": args.name, "gpu": _device(args)}
    out = api.call("POST", "/api/v1/what-if", {k: v for k, v in body.items() if v is not None})
    if shown.json:  # the answer says whether it fits
        return Outcome(out)
    _print_decision(out)
    return Outcome(out, 0 if out["admitted"] else 5)


@command("audit")
def _audit(args: argparse.Namespace, api: Api, shown: Shown) -> Any:
    out = api.call("GET", "/api/v1/audit", params={"tenant": args.name, "action": args.action, "limit": args.limit})
    rows = [
        [
            time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e["at"])),
            e["actor"],
            e["action"],
            e["tenant"] or "-",
            e["result"],
            detail_text(e["detail"])[:100],
        ]
        for e in out
    ]
    shown.say(_table(rows, ["TIME (UTC)", "ACTOR", "ACTION", "TENANT", "RESULT", "DETAIL"]))
    return out


def run(args: argparse.Namespace, api: Api) -> int:
    shown = Shown(bool(getattr(args, "json", False)))
    result = COMMANDS[args.command](args, api, shown)
    answer = result if isinstance(result, Outcome) else Outcome(result)
    if shown.json:
        print(json.dumps(answer.out, indent=2))
    return answer.exit_code


def main(argv: Sequence[str] | None = None, api: Api | None = None) -> int:
    """A command, its errors printed and mapped to the exit codes of ``manager.errors``; ``api``:
    the one to call instead of the manager's (tests)."""
    args = build_parser().parse_args(_sizes_glued(sys.argv[1:] if argv is None else argv))
    try:
        if args.command == "gateway":
            from manager.gateway.server import main as gateway_main

            return gateway_main()
        if args.command == "drain-spool":
            from manager.gateway.drain import drain

            drain(args.data_dir, {str(k): int(v) for k, v in json.loads(args.cursors).items()}, sys.stdout)
            return 0
        if api is not None:
            return run(args, api)
        settings = Settings()
        if args.command == "serve":
            from manager.wiring import serve

            return serve(settings)
        if args.command == "node-agent":
            from manager.agent.main import print_resources
            from manager.agent.main import serve as serve_agent

            return print_resources(settings) if args.resources else serve_agent(settings)
        return run(args, Api(settings))
    except GtmError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        details = exc.details.get("numbers") if exc.details else None
        if details and not getattr(args, "json", False):
            print(
                "numbers: " + ", ".join(f"{k}={_opt_size(v) if isinstance(v, int) else v}" for k, v in details.items()),
                file=sys.stderr,
            )
        return exc.exit_code
    except ValidationError as exc:  # settings that do not validate: each one named as it is set
        print(f"error: invalid settings: {describe(exc)}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"error: invalid settings: {exc}", file=sys.stderr)
        return 2


def _command(name: str) -> Callable[[], int]:
    def entry() -> int:
        return main([name, *sys.argv[1:]])

    entry.__name__ = name.replace("-", "_")
    return entry


add_tenant = _command("add-tenant")
list_tenants = _command("list-tenants")
wait_tenant = _command("wait-tenant")
update_tenant = _command("update-tenant")
remove_tenant = _command("remove-tenant")
rotate_key = _command("rotate-key")
add_member = _command("add-member")
list_members = _command("list-members")
update_member = _command("update-member")
remove_member = _command("remove-member")
capacity = _command("capacity")
rotate_volume_key = _command("rotate-volume-key")
list_models = _command("list-models")
import_model = _command("import-model")
remove_model = _command("remove-model")
what_if = _command("what-if")
audit = _command("audit")


if __name__ == "__main__":
    sys.exit(main())
