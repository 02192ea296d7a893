"""sluice as a proxy to an upstream OpenAI-compatible server, against LiteLLM's proxy, on the
same instant mock upstream, side by side in one run (issue 13).

    python3 -m venv /work/litellm-venv
    /work/litellm-venv/bin/pip install 'litellm[proxy]==1.108.7'   # its own venv, not .venv
    apt-get install -y wrk
    .venv/bin/python benchmarks/upstream_proxy.py --profile --out docs/benchmarks/upstream

Processes, all on 127.0.0.1:

- mock upstreams (this file, `mock` subcommand): a raw asyncio protocol on uvloop with
  httptools' parser that answers `POST /v1/chat/completions` at once from a cached body
  (non-streamed JSON with `usage`; streamed: a role chunk, `max_tokens` content chunks, a
  finish chunk, a usage chunk when `stream_options.include_usage`, `data: [DONE]`, the whole
  stream in one write with a content-length) and `GET /v1/models`. Each answers with its
  own label in `model`: `mock-model` (the one every load goes to), `mock-primary` (one per
  proxy and variant, killed for the fallback measurement) and `mock-backup` (the fallback).
- sluice: one process, `sluice serve --engine synthetic --config FILE`, the mocks as
  upstream backends, with the whole gateway on: a key with rpm, tpm and token and USD
  budgets on a throwaway Redis, Prometheus metrics, the JSON log line, OpenTelemetry spans
  at 100% sampling exported over OTLP/HTTP to a sink in this script.
- LiteLLM: `litellm --config FILE --num_workers 1` from its own venv (`--litellm`), the same
  mocks as `openai/mock-model` deployments, a master key (its virtual keys and limits need
  Postgres), no database, the local model cost map (nothing fetched), `num_retries: 1` and
  the same fallback as sluice.
- with `--bare`: sluice-bare, a second sluice on the same configuration with no keys and
  telemetry off (`SLUICE_TELEMETRY__ENABLED=false`): the proxy path alone, to split
  sluice's figures into what proxying costs and what the gateway and telemetry add.

Measurements (load generator: wrk, C, 1 thread; every measurement runs each target in turn
for `--rounds` rounds, the order reversed every other round; medians over rounds). For
every run the CPU seconds of the target's process (psutil, user + system, its children
included) are read around it, and so is the CPU the rest of the machine spent (whatever
this script did not start), to flag runs disturbed by other work:

1. requests/s at `--connections` (32) connections, non-streamed chats, latency p50/p99,
   CPU per request;
2. added latency: 1 connection, sequential requests; p50 through a proxy minus p50 of the
   mock called directly;
3. streamed chunks/s: `--stream-connections` connections, streamed chats of
   `--stream-tokens` content chunks each, counted in the bodies wrk receives (a Lua
   `response` hook);
4. death to fallback: 4 Python threads send chats for the `fragile` model (its own mock
   per proxy, with `mock-backup` as the fallback) back to back; after `--death-pre` seconds
   the fragile mock is SIGKILLed; reported: the time from the kill to the end of the first
   request answered (200) by the backup, the requests that failed after the kill, and the
   latency of requests answered by the backup from 2 s after the kill. Run for sluice, for
   LiteLLM, and for LiteLLM with `num_retries: 0` in the request (its fastest fallback).
5. with `--profile`: py-spy on sluice during one more run of measurement 1, grouped by package (see
   `profile`); the raw stacks stay in the log folder.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, cast

LITELLM = "/work/litellm-venv/bin/litellm"
LITELLM_KEY = "sk-bench-litellm"
CHAT = "/v1/chat/completions"
PROMPT = [{"role": "user", "content": "Say hello in one short sentence."}]
START_TIMEOUT_S = 180.0
SETTLED_S = 2.0  # "after the fallback": requests started this long after the kill


# -- the mock upstream --------------------------------------------------------------------------
def _http(status: str, content_type: str, body: bytes) -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


@lru_cache(maxsize=256)
def _chat(label: str, stream: bool, tokens: int, usage: bool) -> bytes:
    """A whole chat answer: JSON, or SSE with `tokens` content chunks (sent in one write)."""
    head = {"id": "chatcmpl-mock", "created": 1764547200, "model": label}
    counts = {"prompt_tokens": 12, "completion_tokens": tokens, "total_tokens": 12 + tokens}
    if not stream:
        message = {"role": "assistant", "content": "Hello! " * tokens}
        choice = {"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}
        body = {**head, "object": "chat.completion", "choices": [choice], "usage": counts}
        return _http("200 OK", "application/json", json.dumps(body).encode())
    head["object"] = "chat.completion.chunk"

    def frame(delta: dict[str, Any], finish: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        chunk = {**head, "choices": [choice]}
        return "data: " + json.dumps(chunk, separators=(",", ":")) + "\n\n"

    frames = [frame({"role": "assistant", "content": ""})]
    frames += [frame({"content": f"tok{i} "}) for i in range(tokens)]
    frames.append(frame({}, "stop"))
    if usage:
        last = {**head, "choices": [], "usage": counts}
        frames.append("data: " + json.dumps(last, separators=(",", ":")) + "\n\n")
    frames.append("data: [DONE]\n\n")
    return _http("200 OK", "text/event-stream", "".join(frames).encode())


def _answer(label: str, method: bytes, url: bytes, body: bytes) -> bytes:
    path = url.split(b"?", 1)[0]
    if method == b"POST" and path == CHAT.encode():
        try:
            request = json.loads(body)
        except ValueError:
            request = None
        if not isinstance(request, dict):
            error = {"error": {"message": "bad JSON", "type": "invalid_request_error"}}
            return _http("400 Bad Request", "application/json", json.dumps(error).encode())
        options = request.get("stream_options") or {}
        return _chat(
            label,
            bool(request.get("stream")),
            min(int(request.get("max_tokens") or 16), 4096),
            bool(options.get("include_usage")),
        )
    if method == b"GET" and path in (b"/v1/models", b"/models"):
        model = {"id": label, "object": "model", "created": 0, "owned_by": "mock"}
        return _http(
            "200 OK", "application/json", json.dumps({"object": "list", "data": [model]}).encode()
        )
    if method == b"GET" and path == b"/health":
        return _http("200 OK", "application/json", b"{}")
    error = {"error": {"message": "not found", "type": "not_found_error"}}
    return _http("404 Not Found", "application/json", json.dumps(error).encode())


def serve_mock(port: int, label: str) -> None:
    """Serve the mock upstream on 127.0.0.1:`port` until killed."""
    import asyncio

    import httptools
    import uvloop

    class Protocol(asyncio.Protocol):
        def __init__(self) -> None:
            self.parser = httptools.HttpRequestParser(self)
            self.url = b""
            self.body: list[bytes] = []
            self.transport: asyncio.Transport | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

        def data_received(self, data: bytes) -> None:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError:
                if self.transport is not None:
                    self.transport.close()

        def on_message_begin(self) -> None:
            self.url = b""
            self.body = []

        def on_url(self, url: bytes) -> None:
            self.url += url

        def on_body(self, body: bytes) -> None:
            self.body.append(body)

        def on_message_complete(self) -> None:
            assert self.transport is not None
            method = self.parser.get_method()
            self.transport.write(_answer(label, method, self.url, b"".join(self.body)))
            if not self.parser.should_keep_alive():
                self.transport.close()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            Protocol, "127.0.0.1", port, reuse_address=True, backlog=2048
        )
        async with server:
            await server.serve_forever()

    uvloop.run(main())


# -- starting the processes ---------------------------------------------------------------------
@dataclass
class Proc:
    name: str
    process: subprocess.Popen[bytes]
    port: int
    children: bool = True  # count its children's CPU too

    def cpu_s(self) -> float:
        """User + system CPU seconds of the process (and its children, live ones)."""
        import psutil

        try:
            me = psutil.Process(self.process.pid)
            procs = [me, *(me.children(recursive=True) if self.children else [])]
            total = 0.0
            for proc in procs:
                with contextlib.suppress(psutil.NoSuchProcess):
                    total += sum(proc.cpu_times()[:2])
            return total
        except psutil.NoSuchProcess:
            return float("nan")


@dataclass
class Stack:
    """Every process started, stopped in reverse at the end."""

    log_dir: Path
    procs: list[Proc] = field(default_factory=list)

    def start(
        self,
        name: str,
        command: list[str],
        port: int,
        health: str,
        env: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Proc:
        from sluice.bench.compare import wait_until_ok

        log = (self.log_dir / f"{name}.log").open("wb")
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
        proc = Proc(name, process, port)
        self.procs.append(proc)
        url = f"http://127.0.0.1:{port}{health}"
        if headers:
            ok = _wait_with_headers(url, headers, START_TIMEOUT_S, process)
        else:
            ok = wait_until_ok(url, START_TIMEOUT_S, process, interval_s=0.2)
        if not ok:
            raise SystemExit(f"{name} did not start; see {self.log_dir / name}.log")
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.process.poll() is None:
                proc.process.terminate()
        for proc in self.procs:
            try:
                proc.process.wait(20)
            except subprocess.TimeoutExpired:
                proc.process.kill()


def _wait_with_headers(
    url: str, headers: dict[str, str], timeout_s: float, process: subprocess.Popen[bytes]
) -> bool:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, headers=headers, timeout=2).status_code == 200:
                return True
        time.sleep(0.3)
    return False


def mock_command(port: int, label: str) -> list[str]:
    return [sys.executable, __file__, "mock", "--port", str(port), "--label", label]


# The mock upstreams: process name → the label it answers with in `model`.
MOCKS = {
    "mock": "mock-model",
    "fragile-sluice": "mock-primary",
    "fragile-litellm": "mock-primary",
    "fragile-litellm-0": "mock-primary",
    "backup": "mock-backup",
}


def sluice_config(ports: dict[str, int]) -> dict[str, Any]:
    def backend(name: str, mock: str, model: str) -> dict[str, Any]:
        return {
            "name": name,
            "base_url": f"http://127.0.0.1:{ports[mock]}/v1",
            "models": {model: "mock-model"},
            "health_check_interval_s": 1,
            "timeouts": {"connect_s": 1, "first_token_s": 10, "total_s": 60},
        }

    return {
        "backends": [
            backend("mock", "mock", "mock"),
            backend("primary", "fragile-sluice", "fragile"),
            backend("backup", "backup", "mock-backup"),
        ],
        "routing": {
            "fallbacks": {"fragile": ["mock-backup"]},
            "retries": 1,
            "breaker_failures": 5,
            "breaker_recovery_s": 10,
        },
    }


def litellm_config(ports: dict[str, int]) -> dict[str, Any]:
    def deployment(model: str, mock: str) -> dict[str, Any]:
        params = {
            "model": "openai/mock-model",
            "api_base": f"http://127.0.0.1:{ports[mock]}/v1",
            "api_key": "dummy",
            "timeout": 60,
            "stream_timeout": 10,
        }
        return {"model_name": model, "litellm_params": params}

    return {
        "model_list": [
            deployment("mock", "mock"),
            deployment("fragile", "fragile-litellm"),
            deployment("fragile0", "fragile-litellm-0"),
            deployment("mock-backup", "backup"),
        ],
        "router_settings": {
            "num_retries": 1,
            "fallbacks": [{"fragile": ["mock-backup"]}, {"fragile0": ["mock-backup"]}],
        },
        "litellm_settings": {"set_verbose": False, "drop_params": True},
        "general_settings": {"master_key": LITELLM_KEY},
    }


LITELLM_ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no fetch of the price map at start
    "LITELLM_LOG": "ERROR",
    "DO_NOT_TRACK": "1",
    "DISABLE_ADMIN_UI": "True",
}


# -- wrk ----------------------------------------------------------------------------------------
WRK_LUA = """
wrk.method = "POST"
wrk.body = [==[BODY]==]
wrk.headers["Content-Type"] = "application/json"
AUTH
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) chunks = 0 end
COUNT
function done(summary, latency, requests)
  local total = 0
  for _, t in ipairs(threads) do total = total + (t:get("chunks") or 0) end
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"status_errors":%d,"connect_errors":%d,' ..
    '"read_errors":%d,"write_errors":%d,"timeouts":%d,"p50_us":%d,"p90_us":%d,' ..
    '"p99_us":%d,"max_us":%d,"chunks":%d}\\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, total))
end
"""
COUNT_LUA = """
function response(status, headers, body)
  if status == 200 then
    local _, n = string.gsub(body, '"content":%s*"[^"]', "")
    chunks = chunks + n
  end
end
"""


@dataclass
class Target:
    name: str
    proc: Proc
    model: str
    key: str | None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.proc.port}{CHAT}"


def wrk(
    target: Target, body: dict[str, Any], connections: int, duration_s: float, work: Path
) -> dict[str, Any]:
    """One wrk run against `target`; its summary plus the target's CPU seconds."""
    script = (
        WRK_LUA.replace("BODY", json.dumps(body))
        .replace(
            "AUTH",
            f'wrk.headers["Authorization"] = "Bearer {target.key}"' if target.key else "",
        )
        .replace("COUNT", COUNT_LUA if body.get("stream") else "")
    )
    path = work / f"wrk-{target.name}.lua"
    path.write_text(script)
    command = ["wrk", "-t1", f"-c{connections}", f"-d{duration_s:g}s", "--timeout", "10s"]
    before, machine, ours = target.proc.cpu_s(), _machine_busy_s(), _ours_s()
    done = subprocess.run(
        [*command, "-s", str(path), target.url], capture_output=True, text=True, check=True
    )
    cpu = target.proc.cpu_s() - before
    others = _machine_busy_s() - machine - (_ours_s() - ours)
    line = next(x for x in done.stdout.splitlines() if x.startswith("WRKJSON "))
    summary: dict[str, Any] = json.loads(line.removeprefix("WRKJSON "))
    seconds = summary["duration_us"] / 1e6
    ok = summary["requests"] - summary["status_errors"]
    errors = sum(summary[k] for k in ("status_errors", "connect_errors", "read_errors"))
    errors += summary["write_errors"] + summary["timeouts"]
    return {
        "target": target.name,
        "connections": connections,
        "seconds": seconds,
        "requests": summary["requests"],
        "errors": errors,
        "req_per_s": ok / seconds,
        "p50_ms": summary["p50_us"] / 1000,
        "p90_ms": summary["p90_us"] / 1000,
        "p99_ms": summary["p99_us"] / 1000,
        "max_ms": summary["max_us"] / 1000,
        "chunks_per_s": summary["chunks"] / seconds,
        "chunks": summary["chunks"],
        "cpu_s": cpu,
        "cpu_ms_per_request": 1000 * cpu / ok if ok else None,
        "cpu_busy": cpu / seconds,
        "others_busy": max(0.0, others / seconds),
    }


def _machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (all cores)."""
    import psutil

    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def _ours_s() -> float:
    """CPU seconds of this script and everything it started (live descendants, and the
    children it has reaped, such as every finished wrk)."""
    import psutil

    me = psutil.Process()
    total = sum(os.times()[:4])
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += sum(child.cpu_times()[:2])
    return total


def body_of(target: Target, *, stream: bool, tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {"model": target.model, "messages": PROMPT, "max_tokens": tokens}
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def rounds(
    kind: str,
    targets: list[Target],
    args: argparse.Namespace,
    work: Path,
    *,
    connections: int,
    stream: bool,
    tokens: int,
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for round_no in range(1, args.rounds + 1):
        order = targets if round_no % 2 else list(reversed(targets))
        for target in order:
            body = body_of(target, stream=stream, tokens=tokens)
            row = wrk(target, body, connections, args.duration, work)
            row.update(kind=kind, round=round_no)
            rows.append(row)
            print(json.dumps(row), flush=True)
            time.sleep(0.5)
    return rows


# -- death to fallback --------------------------------------------------------------------------
def death(
    target: Target,
    fragile: Proc,
    args: argparse.Namespace,
    *,
    model: str = "fragile",
    label: str | None = None,
    extra: dict[str, Any] | None = None,
    workers: int = 4,
) -> dict[str, Any]:
    """Steady load on `model` through `target`; SIGKILL its mock, `fragile`; how long until
    the backup answers, and what failed in between (module docstring)."""
    import httpx

    records: list[tuple[float, float, int, str]] = []  # start, end, status, answered by
    lock = threading.Lock()
    stop = threading.Event()
    headers = {"Authorization": f"Bearer {target.key}"} if target.key else {}
    body = {"model": model, "messages": PROMPT, "max_tokens": 16, **(extra or {})}

    def work() -> None:
        with httpx.Client(timeout=30, headers=headers) as client:
            while not stop.is_set():
                start = time.monotonic()
                try:
                    response = client.post(target.url, json=body)
                    status = response.status_code
                    by = "?"
                    if status == 200:
                        by = str(response.json().get("model"))
                except httpx.HTTPError as exc:
                    status, by = 0, type(exc).__name__
                with lock:
                    records.append((start, time.monotonic(), status, by))

    threads = [threading.Thread(target=work, daemon=True) for _ in range(workers)]
    for thread in threads:
        thread.start()
    time.sleep(args.death_pre)
    killed = time.monotonic()
    os.kill(fragile.process.pid, signal.SIGKILL)
    fragile.process.wait()
    time.sleep(args.death_post)
    stop.set()
    for thread in threads:
        thread.join(35)
    before = [r for r in records if r[1] <= killed]
    after = sorted((r for r in records if r[1] > killed), key=lambda r: r[1])
    backup = [r for r in after if r[2] == 200 and r[3] == "mock-backup"]
    failed = [r for r in after if r[2] != 200]
    first = backup[0] if backup else None
    settled = [r for r in backup if r[0] > killed + SETTLED_S]
    row = {
        "target": label or target.name,
        "kind": "death",
        "workers": workers,
        "before_ok": sum(1 for r in before if r[2] == 200),
        "before_p50_ms": _p50([r[1] - r[0] for r in before if r[2] == 200]),
        "kill_to_first_backup_ms": 1000 * (first[1] - killed) if first else None,
        "failed_after_kill": len(failed),
        "failures": sorted({f"{r[2]} {r[3]}" for r in failed}),
        "primary_after_kill": sum(1 for r in after if r[2] == 200 and r[3] == "mock-primary"),
        "backup_ok": len(backup),
        "backup_max_ms": max((1000 * (r[1] - r[0]) for r in backup), default=None),
        "settled_p50_ms": _p50([r[1] - r[0] for r in settled]),
        "settled_req_per_s": len(settled) / max(1e-9, args.death_post - SETTLED_S),
    }
    print(json.dumps(row), flush=True)
    return row


def _p50(values: list[float]) -> float | None:
    return 1000 * statistics.median(values) if values else None


# -- the run --------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    mock = sub.add_parser("mock", help="serve one mock upstream (used by the run)")
    mock.add_argument("--port", type=int, required=True)
    mock.add_argument("--label", default="mock-model")
    parser.add_argument("--litellm", default=LITELLM, help="LiteLLM's `litellm` command")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--stream-connections", type=int, default=16)
    parser.add_argument("--stream-tokens", type=int, default=256)
    parser.add_argument("--death-pre", type=float, default=2.0, help="load before the kill, s")
    parser.add_argument("--death-post", type=float, default=6.0, help="load after the kill, s")
    parser.add_argument(
        "--skip", default="", help="comma-separated: throughput,latency,stream,death"
    )
    parser.add_argument(
        "--profile", action="store_true", help="py-spy on sluice during one more throughput run"
    )
    parser.add_argument(
        "--bare",
        action="store_true",
        help="also sluice with no keys and telemetry off (the proxy path alone)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench-results/upstream"))
    args = parser.parse_args()
    if args.command == "mock":
        serve_mock(args.port, args.label)
        return
    run(args)


def run(args: argparse.Namespace) -> None:
    import yaml

    from sluice.bench.compare import OtlpSink, bench_key, free_port, gateway_on_redis

    skip = set(filter(None, args.skip.split(",")))
    work = Path(tempfile.mkdtemp(prefix="sluice-upstream-proxy-"))
    print(f"logs in {work}", flush=True)
    stack = Stack(work)
    sink = OtlpSink()
    with gateway_on_redis(work) as gateway_env:
        try:
            mocks = {}
            for name, label in MOCKS.items():
                port = free_port()
                mocks[name] = stack.start(name, mock_command(port, label), port, "/v1/models")
            mocks["mock"].children = False
            ports = {name: proc.port for name, proc in mocks.items()}

            (work / "sluice.yaml").write_text(yaml.safe_dump(sluice_config(ports)))

            def sluice_command(port: int) -> list[str]:
                command = [sys.executable, "-m", "sluice", "serve", "--engine", "synthetic"]
                return [*command, "--config", str(work / "sluice.yaml"), "--port", str(port)]

            port = free_port()
            command = sluice_command(port)
            sluice = stack.start(
                "sluice",
                command,
                port,
                "/readyz",
                {
                    **gateway_env,
                    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": sink.url,
                    "SLUICE_TELEMETRY__TRACE_SAMPLE_RATIO": "1.0",
                },
            )
            key = bench_key(f"http://127.0.0.1:{port}/v1")
            bare = None
            if args.bare:
                port = free_port()
                command = sluice_command(port)
                bare_env = {
                    "SLUICE_TELEMETRY__ENABLED": "false",
                    "SLUICE_GATEWAY__DATABASE": str(work / "bare.db"),
                }
                bare = stack.start("sluice-bare", command, port, "/readyz", bare_env)

            (work / "litellm.yaml").write_text(yaml.safe_dump(litellm_config(ports)))
            port = free_port()
            command = [args.litellm, "--config", str(work / "litellm.yaml"), "--port", str(port)]
            command += ["--host", "127.0.0.1", "--num_workers", "1"]
            litellm = stack.start(
                "litellm",
                command,
                port,
                "/v1/models",
                LITELLM_ENV,
                headers={"Authorization": f"Bearer {LITELLM_KEY}"},
            )
            targets = [
                Target("direct", mocks["mock"], "mock-model", None),
                Target("sluice", sluice, "mock", key),
                Target("litellm", litellm, "mock", LITELLM_KEY),
            ]
            if bare is not None:
                targets.insert(2, Target("sluice-bare", bare, "mock", None))
            result = measure(targets, mocks, args, work, skip)
            result["otlp_exports"] = sink.exports
            result["versions"] = versions(args.litellm)
        finally:
            stack.stop()
    report(result, args)


def measure(
    targets: list[Target],
    mocks: dict[str, Proc],
    args: argparse.Namespace,
    work: Path,
    skip: set[str],
) -> dict[str, Any]:
    for target in targets:  # warm-up: connections, caches, first-request paths
        wrk(target, body_of(target, stream=False, tokens=16), 4, 1, work)
        wrk(target, body_of(target, stream=True, tokens=8), 2, 1, work)
    rows: list[dict[str, Any]] = []
    c, sc = args.connections, args.stream_connections
    if "throughput" not in skip:
        rows += rounds("throughput", targets, args, work, connections=c, stream=False, tokens=16)
    if "latency" not in skip:
        rows += rounds("latency", targets, args, work, connections=1, stream=False, tokens=16)
    if "stream" not in skip:
        tokens = args.stream_tokens
        rows += rounds("stream", targets, args, work, connections=sc, stream=True, tokens=tokens)
    result: dict[str, Any] = {"rows": rows, "death": []}
    if args.profile:
        result["profile"] = profile(targets[1], args, work)
    if "death" not in skip:
        sluice, litellm = targets[1], targets[-1]
        result["death"] = [
            death(sluice, mocks["fragile-sluice"], args),
            death(litellm, mocks["fragile-litellm"], args),
            death(
                litellm,
                mocks["fragile-litellm-0"],
                args,
                model="fragile0",
                label="litellm, num_retries 0",
                extra={"num_retries": 0},
            ),
        ]
    return result


def profile(target: Target, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """py-spy on `target` during one more throughput run: each sample (all the process's
    threads; py-spy leaves out idle ones) goes to the innermost frame of a third-party
    package or a sluice module on its stack (the standard library, anyio and sniffio count
    for their caller), grouped by `PROFILE_GROUPS`."""
    raw = work / "py-spy-sluice.txt"
    py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or "py-spy"
    command = [py_spy, "record", "--format", "raw", "--full-filenames", "--rate", "200"]
    command += ["--duration", "9", "--pid", str(target.proc.process.pid), "--output", str(raw)]
    spy = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1)  # py-spy attaches
    row = wrk(target, body_of(target, stream=False, tokens=16), args.connections, 7, work)
    spy.wait(60)
    counts: dict[str, int] = {}
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        group = "standard library only (event loop, threads)"
        for frame in reversed(stack.split(";")):
            owner = _owner(frame)
            if owner is not None:
                group = next((g for g, ps in PROFILE_GROUPS.items() if owner in ps), owner)
                break
        counts[group] = counts.get(group, 0) + int(count)
    total = sum(counts.values())
    shares = {g: n / total for g, n in sorted(counts.items(), key=lambda x: -x[1])}
    print(json.dumps({"profile": shares, "req_per_s": row["req_per_s"], "file": str(raw)}))
    return {"req_per_s_while_profiled": row["req_per_s"], "samples": total, "shares": shares}


def _owner(frame: str) -> str | None:
    """The package (`httpx`) or sluice module (`sluice.gateway`) of a py-spy frame, or None
    for the standard library and async plumbing."""
    path = frame.rpartition(" (")[2].rpartition(":")[0]
    if "site-packages/" in path:
        package = path.split("site-packages/", 1)[1].split("/", 1)[0].removesuffix(".py")
        return None if package in ("anyio", "sniffio") else package
    if "/sluice/" in path:
        parts = path.rsplit("/sluice/", 1)[1].split("/")
        return "sluice." + parts[0].removesuffix(".py") if len(parts) > 1 else "sluice"
    return None


PROFILE_GROUPS = {
    "upstream HTTP client (httpx, httpcore, h11)": ("httpx", "httpcore", "h11"),
    "Redis client (gateway's reserve and settle)": ("redis",),
    "OpenTelemetry (spans, ASGI middleware, OTLP export)": (
        "opentelemetry",
        "requests",  # the OTLP/HTTP exporter's client
        "urllib3",
        "google",  # protobuf, the export's encoding
    ),
    "HTTP server (uvicorn, httptools)": ("uvicorn", "httptools"),
    "framework (Starlette, FastAPI, pydantic)": ("starlette", "fastapi", "pydantic"),
    "Prometheus metrics": ("prometheus_client",),
    "sluice: proxy (backends/)": ("sluice.backends",),
    "sluice: gateway (keys, limits)": ("sluice.gateway",),
    "sluice: API, middleware": ("sluice.api", "sluice.app"),
    "sluice: telemetry (log line, record)": ("sluice.telemetry",),
}


def versions(litellm: str) -> dict[str, str]:
    from importlib.metadata import version

    python = str(Path(litellm).with_name("python"))
    done = subprocess.run(
        [python, "-c", "from importlib.metadata import version; print(version('litellm'))"],
        capture_output=True,
        text=True,
    )
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True)
    return {
        "sluice": version("sluice"),
        "sluice_commit": commit,
        "litellm": done.stdout.strip(),
        "wrk": (wrk_version.stdout or wrk_version.stderr).split("\n")[0].strip(),
    }


# -- the report ---------------------------------------------------------------------------------
TARGETS = ("direct", "sluice", "sluice-bare", "litellm")  # sluice-bare only with --bare


SUMMARY_FIELDS = (
    "req_per_s",
    "p50_ms",
    "p99_ms",
    "chunks_per_s",
    "cpu_ms_per_request",
    "cpu_busy",
    "others_busy",
    "errors",
)


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float | None]]]:
    """Medians over rounds: kind → target → field → value."""
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for kind in ("throughput", "latency", "stream"):
        for target in TARGETS:
            mine = [r for r in rows if r["kind"] == kind and r["target"] == target]
            if not mine:
                continue
            out.setdefault(kind, {})[target] = {
                f: statistics.median(float(r[f]) for r in mine if r[f] is not None)
                if any(r[f] is not None for r in mine)
                else None
                for f in SUMMARY_FIELDS
            }
    return out


def report(result: dict[str, Any], args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    summary = summarise(result["rows"])
    measured = {row["target"] for row in result["rows"]}
    targets = [target for target in TARGETS if target in measured]
    result["summary"] = summary
    versions = result["versions"]
    title = f"sluice {versions['sluice']} vs LiteLLM {versions['litellm']} (medians over rounds)"
    table = Table(title=title)
    table.add_column("measure")
    for target in targets:
        table.add_column(target, justify="right")

    def cells(kind: str, field: str, fmt: str) -> list[str]:
        values = [summary.get(kind, {}).get(t, {}).get(field) for t in targets]
        return [format(v, fmt) if v is not None else "-" for v in values]

    c, s = args.connections, args.stream_connections
    table.add_row(f"req/s at {c} connections", *cells("throughput", "req_per_s", ".0f"))
    table.add_row(f"  p50 ms at {c}", *cells("throughput", "p50_ms", ".2f"))
    table.add_row(f"  p99 ms at {c}", *cells("throughput", "p99_ms", ".2f"))
    table.add_row("  CPU ms per request", *cells("throughput", "cpu_ms_per_request", ".3f"))
    table.add_row("  CPU busy (cores)", *cells("throughput", "cpu_busy", ".2f"))
    table.add_row("  errors (median per run)", *cells("throughput", "errors", ".0f"))
    table.add_row("  other processes' CPU (cores)", *cells("throughput", "others_busy", ".2f"))
    table.add_row("req/s at 1 connection", *cells("latency", "req_per_s", ".0f"))
    table.add_row("  p50 ms at 1", *cells("latency", "p50_ms", ".3f"))
    table.add_row("  p99 ms at 1", *cells("latency", "p99_ms", ".3f"))
    table.add_row("  CPU ms per request at 1", *cells("latency", "cpu_ms_per_request", ".3f"))
    table.add_row("  other processes' CPU (cores)", *cells("latency", "others_busy", ".2f"))
    direct = summary.get("latency", {}).get("direct", {}).get("p50_ms")
    added = []
    for target in targets:
        p50 = summary.get("latency", {}).get(target, {}).get("p50_ms")
        added.append(
            f"{p50 - direct:+.3f}"
            if p50 is not None and direct is not None and target != "direct"
            else "-"
        )
    table.add_row("  added p50 ms (goal ≤ 1)", *added)
    result["added_p50_ms"] = dict(zip(targets, added, strict=True))
    table.add_row(f"streamed chunks/s at {s} streams", *cells("stream", "chunks_per_s", ".0f"))
    table.add_row("  stream req/s", *cells("stream", "req_per_s", ".1f"))
    table.add_row("  CPU ms per stream", *cells("stream", "cpu_ms_per_request", ".2f"))
    table.add_row("  CPU busy (cores)", *cells("stream", "cpu_busy", ".2f"))
    table.add_row("  other processes' CPU (cores)", *cells("stream", "others_busy", ".2f"))
    console.print(table)

    if result.get("profile"):
        profiled = result["profile"]
        title = (
            f"where sluice's CPU goes at {c} connections (py-spy, {profiled['samples']} "
            f"samples, {profiled['req_per_s_while_profiled']:.0f} req/s while profiled)"
        )
        table = Table(title=title)
        table.add_column("innermost package on the stack")
        table.add_column("share of samples", justify="right")
        for group, share in profiled["shares"].items():
            table.add_row(group, f"{share:.1%}")
        console.print(table)

    if result["death"]:
        table = Table(
            title="upstream death → fallback (fragile mock SIGKILLed under 4-thread load)"
        )
        for column in (
            "proxy",
            "kill → first backup 200",
            "failed after kill",
            "failures",
            "backup max latency",
            "p50 latency 2 s after",
            "req/s 2 s after",
            "p50 before",
        ):
            table.add_column(column, justify="right")
        for row in result["death"]:

            def ms(value: float | None) -> str:
                return f"{value:.1f} ms" if value is not None else "-"

            table.add_row(
                row["target"],
                ms(row["kill_to_first_backup_ms"]),
                str(row["failed_after_kill"]),
                ", ".join(row["failures"]) or "-",
                ms(row["backup_max_ms"]),
                ms(row["settled_p50_ms"]),
                f"{row['settled_req_per_s']:.0f}",
                ms(row["before_p50_ms"]),
            )
        console.print(table)

    args.out.mkdir(parents=True, exist_ok=True)
    result["date"] = datetime.date.today().isoformat()
    result["args"] = {k: str(v) for k, v in vars(args).items()}
    path = args.out / f"{result['date']}.json"
    if path.exists():
        path = args.out / f"{result['date']}-{datetime.datetime.now():%H%M%S}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
