"""`sluice keys create|list|revoke|usage`, and the start-up check that refuses open binds.

The commands work on the same store the server reads (the settings' `gateway.store`:
the SQLite file, or Redis), so they work whether or not a server is running; a running
server sees a change within `gateway.key_cache_s`.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import ipaddress
import json
import logging
import os
import socket
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from sluice.config import Settings, nested_overrides
from sluice.errors import InvalidRequest
from sluice.gateway.keyadmin import DEFAULT_GRACE_S, KeyAdmin, describe_usage
from sluice.gateway.keys import KeyPolicy
from sluice.gateway.service import build_keys, close_keys
from sluice.gateway.store_redis import StoreFailure

logger = logging.getLogger(__name__)

POLICY_FLAGS = {
    "--rpm": {"type": int, "help": "requests per minute"},
    "--tpm": {"type": int, "help": "tokens per minute"},
    "--max-tokens": {"type": int, "help": "largest max_tokens per choice"},
    "--budget-tokens": {"type": int, "help": "tokens per budget window"},
    "--budget-tokens-window": {"choices": ["hour", "day", "month"]},
    "--budget-usd": {"type": float, "help": "USD per budget window"},
    "--budget-usd-window": {"choices": ["hour", "day", "month"]},
    "--priority": {"choices": ["high", "normal", "low"]},
    "--models": {"nargs": "+", "help": "allowed model ids (default: all)"},
    "--max-concurrent": {"type": int, "help": "requests in flight at once"},
    "--expires-at": {"help": "when the key stops working, ISO 8601 (2027-01-31T00:00:00Z)"},
}
CLEARABLE = [flag[2:].replace("-", "_") for flag in POLICY_FLAGS if "window" not in flag]


# Where the keys live, as `sluice serve` takes it: flag -> (settings path, argparse options).
STORE_FLAGS: dict[str, tuple[str, dict[str, object]]] = {
    "--config": ("config_file", {"type": Path, "help": "YAML settings file"}),
    "--store": ("gateway.store", {"choices": ["embedded", "redis"], "help": "key store"}),
    "--database": ("gateway.database", {"type": Path, "help": "SQLite file (embedded store)"}),
    "--redis-url": ("gateway.redis_url", {"help": "redis://host:port/db (store=redis)"}),
    "--keys-file": ("gateway.keys_file", {"type": Path, "help": "declarative YAML keys"}),
}


def _store_arguments(parser: argparse.ArgumentParser, default: object) -> None:
    for flag, (_path, options) in STORE_FLAGS.items():
        parser.add_argument(flag, default=default, **options)  # type: ignore[arg-type]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`keys` and its commands; the store options work before or after the command."""
    _store_arguments(parser, None)
    commands = parser.add_subparsers(dest="keys_command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help)
        _store_arguments(sub, argparse.SUPPRESS)  # given here, it wins; else the one before
        return sub

    create = command("create", "create a key and print its secret once")
    create.add_argument("name")
    for flag, options in POLICY_FLAGS.items():
        create.add_argument(flag, default=None, **options)  # type: ignore[arg-type]
    create.add_argument("--disabled", action="store_true", help="create it disabled")
    command("list", "list keys (never their secrets)")
    update = command("update", "change a key's policy in place (secret and spend stay)")
    update.add_argument("name")
    for flag, options in POLICY_FLAGS.items():
        update.add_argument(flag, default=None, **options)  # type: ignore[arg-type]
    state = update.add_mutually_exclusive_group()
    state.add_argument("--enable", action="store_true", help="enable the key")
    state.add_argument("--disable", action="store_true", help="disable the key")
    update.add_argument(
        "--clear",
        nargs="+",
        default=[],
        choices=CLEARABLE,
        metavar="FIELD",
        help=f"remove these limits ({', '.join(CLEARABLE)})",
    )
    rotate = command("rotate", "give a key a new secret; the old one works for --grace")
    rotate.add_argument("name")
    rotate.add_argument(
        "--grace",
        type=float,
        default=DEFAULT_GRACE_S,
        help=f"seconds the old secret keeps working (default: {DEFAULT_GRACE_S:g})",
    )
    revoke = command("revoke", "revoke a key")
    revoke.add_argument("name")
    usage = command("usage", "a key's spend this hour, day and month")
    usage.add_argument("name")
    usage.add_argument("--json", action="store_true", help="print JSON")


def store_settings(args: argparse.Namespace) -> Settings:
    """Settings with the store flags given on top of env, YAML and defaults."""
    given = {
        path: getattr(args, flag[2:].replace("-", "_"), None)
        for flag, (path, _) in STORE_FLAGS.items()
    }
    return Settings(**nested_overrides(given))


def _admin(settings: Settings) -> KeyAdmin:
    return KeyAdmin(*build_keys(settings, cache_s=0.0), actor=cli_actor())


def cli_actor() -> str:
    """Who runs `sluice keys`, for the audit line: the OS user and the host."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"cli:{user}@{socket.gethostname()}"


def _policy_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The policy flags given on the command line."""
    fields = {}
    for flag in POLICY_FLAGS:
        name = flag[2:].replace("-", "_")
        value = getattr(args, name)
        if value is not None:
            fields[name] = value
    return fields


def _when(ts: float | None) -> str:
    return "" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M")


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    admin = _admin(settings)
    console = Console()
    try:
        if args.keys_command == "create":
            policy = KeyPolicy.model_validate(
                {"name": args.name, "enabled": not args.disabled, **_policy_fields(args)}
            )
            created = await admin.create(policy)
            console.print(f"created key '{policy.name}'. Its secret, shown only now:")
            print(created.secret)
        elif args.keys_command == "update":
            changes = {**_policy_fields(args), **dict.fromkeys(args.clear)}
            if args.enable or args.disable:
                changes["enabled"] = bool(args.enable)
            if not changes:
                raise InvalidRequest("Nothing to change: give a policy flag, --clear or --enable.")
            await admin.update(args.name, changes)
            console.print(f"updated key '{args.name}'")
        elif args.keys_command == "rotate":
            created = await admin.rotate(args.name, args.grace)
            console.print(
                f"rotated key '{args.name}': the old secret works for {args.grace:g} s more. "
                "The new secret, shown only now:"
            )
            print(created.secret)
        elif args.keys_command == "list":
            table = Table(title="API keys")
            for column in ("name", "state", "priority", "rpm", "tpm", "budget", "created"):
                table.add_column(column)
            now = time.time()
            for key in await admin.list():
                p = key.policy
                if key.revoked_at is not None:
                    state = (
                        "revoked"
                        if key.revoked_at <= now
                        else f"rotated, until {_when(key.revoked_at)}"
                    )
                elif p.expired(now):
                    state = "expired"
                else:
                    state = "enabled" if p.enabled else "disabled"
                budgets = [
                    f"{p.budget_tokens} tok/{p.budget_tokens_window}" if p.budget_tokens else "",
                    f"${p.budget_usd:g}/{p.budget_usd_window}" if p.budget_usd else "",
                ]
                table.add_row(
                    p.name,
                    f"{state} ({key.source})",
                    p.priority,
                    str(p.rpm or "-"),
                    str(p.tpm or "-"),
                    " ".join(b for b in budgets if b) or "-",
                    _when(key.created_at),
                )
            console.print(table)
        elif args.keys_command == "revoke":
            await admin.revoke(args.name)
            console.print(f"revoked key '{args.name}'")
        else:
            usage = await admin.usage(args.name)
            if args.json:
                print(json.dumps(describe_usage(usage)))
                return 0
            table = Table(title=f"usage of '{usage.key}' (calendar windows, UTC)")
            for column in ("window", "since", "tokens", "USD"):
                table.add_column(column)
            for w in usage.windows:
                table.add_row(w.window, _when(w.start), str(w.tokens), f"{w.usd:.6f}")
            table.add_row(
                "reserved now", "", str(usage.reserved_tokens), f"{usage.reserved_usd:.6f}"
            )
            console.print(table)
        return 0
    finally:
        await close_keys(admin.keys, admin.quota)


def keys(args: argparse.Namespace) -> int:
    """Run a `sluice keys` command; errors come back as SluiceError / StoreFailure."""
    return asyncio.run(_run(args, store_settings(args)))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def _keys_required(settings: Settings) -> bool:
    """What the server's `KeyRing` will answer: does any key (file or store) exist?"""
    keys, quota = build_keys(settings, cache_s=0.0)
    try:
        return await keys.required()
    finally:
        await close_keys(keys, quota)


def open_bind_refusal(settings: Settings) -> str | None:
    """Why serving would expose an open server beyond this machine, or None if it is fine."""
    if is_loopback(settings.host):
        return None
    if settings.gateway.insecure_no_auth:
        logger.warning("serving on %s with --insecure-no-auth: no API key needed", settings.host)
        return None
    try:
        if asyncio.run(_keys_required(settings)):
            return None
    except StoreFailure as exc:
        return f"cannot reach the limits store to check for API keys ({exc})"
    return (
        f"refusing to serve on {settings.host} without API keys. Create one "
        "('sluice keys create NAME'), give --keys-file, or pass --insecure-no-auth"
    )
