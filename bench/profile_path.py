"""CPU time of a proxy process per request and per streamed chunk, and where it goes.

Throughput on a shared 2-core machine moves with whatever else runs; the CPU seconds a proxy
process spends on a fixed number of requests move much less. This script starts the harness's
fake upstream (../shared/bench/fake_together.py, core 0) and one or more proxies (core 1):
together-meter from a source tree (`NAME=TREE`, default this checkout) with its bench/config.yaml
and a fresh SQLite ledger, or the harness's naive proxy (`naive`). It drives a fixed number of
requests at a fixed concurrency from this process (core 0; uvloop + httptools, one request in
flight per keep-alive connection) and reads each proxy's CPU time (all its threads, from
/proc/PID/task/*/schedstat) just before and after each measured batch. With several targets the
batches alternate between them (the order rotated each repetition), so a slow spell of the
machine hits all of them alike, and each repetition's ratio to the first target is reported
(paired, like bench/paired.py).

Phases (each: a warm-up, then `--reps` measured batches per target):
  nonstream          POST /v1/chat/completions, 1 KB body, JSON answer
  stream/K           the same with "stream": true; the upstream sends K chunks 1 ms apart
Per chunk = (CPU per stream at K2 - CPU per stream at K1) / (K2 - K1): the slope, free of the
per-request part; per-stream fixed part = CPU per stream at K1 - K1 x per chunk. Interference
only ever adds CPU time, so the minimum over repetitions is the steadier figure on a busy
machine; the median is printed too.

`--sample OUT` samples the first target with py-spy (1 kHz, not pausing it) during its last
measured batch of each phase and prints own and inclusive shares per function (OUT.1, ...).
`--profile OUT.prof` runs the first target under cProfile, switched on for its last measured
batch of each phase (SIGUSR1 on, SIGUSR2 off and dump to OUT.prof.1, ...), and prints the top
entries by own time. Profiled runs are slower: read CPU figures from an unprofiled run.

    .venv/bin/python bench/profile_path.py                              # this checkout
    .venv/bin/python bench/profile_path.py old=/tmp/old-tree new=. naive  # paired, one run
    .venv/bin/python bench/profile_path.py --sample /tmp/ours.spy --reps 1

Loopback only; every batch is bounded (a per-request timeout and a deadline per batch).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pstats
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
UPSTREAM_PORT = 18400
FIRST_PORT = 18401  # target i listens on FIRST_PORT + 10 i (admin: + 1)
MODEL = "meta-llama/Llama-3.3-70B-Instruct-Turbo"
AUTH = "sk-bench-tenant-a"
BATCH_DEADLINE = 120.0  # seconds: a measured batch that takes longer is a failure


@dataclass
class Target:
    name: str
    src: str | None  # a together-meter source tree; None: the harness's naive proxy
    port: int
    proc: subprocess.Popen[bytes] | None = None
    cpu: dict[str, list[float]] = field(default_factory=dict)  # phase -> CPU s/request per rep
    p50: dict[str, list[float]] = field(default_factory=dict)


def parse_targets(specs: list[str]) -> list[Target]:
    out = []
    for i, spec in enumerate(specs or [f"ours={ROOT}"]):
        name, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
        src = None if path == "naive" else str(Path(path).resolve())
        out.append(
            Target(name or ("naive" if src is None else Path(path).resolve().name), src, FIRST_PORT + 10 * i)
        )
    return out


# -- the proxy under cProfile (this file re-executes itself with --serve-profiled) ------------


def serve_profiled(out: str, argv: list[str]) -> int:
    """Run `together-meter <argv>`; SIGUSR1 starts a profile, SIGUSR2 stops it and dumps it to
    OUT.1, OUT.2, ... (one per measured phase)."""
    import cProfile

    profs: list[cProfile.Profile] = []

    def on(_sig: int, _frame: object) -> None:
        profs.append(cProfile.Profile())
        profs[-1].enable()

    def off(_sig: int, _frame: object) -> None:
        profs[-1].disable()
        profs[-1].dump_stats(f"{out}.{len(profs)}")  # one file per measured phase

    signal.signal(signal.SIGUSR1, on)
    signal.signal(signal.SIGUSR2, off)
    from proxy.cli import main

    sys.argv = ["together-meter", *argv]
    return main()


# -- processes ---------------------------------------------------------------------------------


def _wait_http(url: str, proc: subprocess.Popen[bytes], what: str) -> None:
    for _ in range(150):
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as r:
            if r.status == 200:
                return
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}")
        time.sleep(0.1)
    raise SystemExit(f"{what} not ready at {url}")


def start_upstream(args: argparse.Namespace, chunks: int) -> subprocess.Popen[bytes]:
    cmd = [
        "taskset", "-c", args.upstream_cpus, args.bench_python, str(args.shared / "fake_together.py"),
        "--port", str(UPSTREAM_PORT), "--chunks", str(chunks), "--chunk-delay-ms", str(args.chunk_delay_ms),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_http(f"http://127.0.0.1:{UPSTREAM_PORT}/health", proc, "fake upstream")
    return proc


def start_proxy(args: argparse.Namespace, t: Target, workdir: str, profiled: bool) -> None:
    upstream = f"http://127.0.0.1:{UPSTREAM_PORT}/v1"
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("https_proxy", "http_proxy", "all_proxy")}
    if t.src is None:
        cmd = [args.bench_python, str(args.shared / "naive_proxy.py"), "--port", str(t.port),
               "--upstream", upstream]  # fmt: skip
        ready = f"http://127.0.0.1:{t.port}/metrics"
    else:
        env.update(PYTHONPATH=t.src, TOGETHER_API_KEY="fake-together-key")
        serve = ["--log-level", "WARNING", "serve", "--port", str(t.port), "--admin-port", str(t.port + 1),
                 "--config", f"{t.src}/bench/config.yaml", "--upstream", upstream,
                 "--ledger", f"{workdir}/{t.name}-ledger.db"]  # fmt: skip
        if profiled:
            cmd = [
                args.python,
                "-P",
                str(HERE / "profile_path.py"),
                "--serve-profiled",
                args.profile,
                "--",
                *serve,
            ]
        else:
            cmd = [
                args.python,
                "-P",
                "-c",
                "import sys; from proxy.cli import main; sys.exit(main())",
                *serve,
            ]
        ready = f"http://127.0.0.1:{t.port + 1}/healthz"
    t.proc = subprocess.Popen(
        ["taskset", "-c", args.proxy_cpus, *cmd],
        cwd=t.src,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(f"{workdir}/{t.name}.log", "wb"),  # noqa: SIM115 - closed with the process
    )
    _wait_http(ready, t.proc, t.name)


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


# -- the driver ------------------------------------------------------------------------------


def request_bytes(stream: bool) -> bytes:
    body: dict[str, object] = {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": ""},
        ],
        "max_tokens": 64,
        "temperature": 0.7,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    need = 1024 - len(json.dumps(body, separators=(",", ":")))
    body["messages"][1]["content"] = ("lorem ipsum dolor sit amet " * 60)[:need]  # type: ignore[index]
    raw = json.dumps(body, separators=(",", ":")).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nAuthorization: Bearer {AUTH}\r\n"
        f"Content-Length: {len(raw)}\r\n\r\n"
    )
    return head.encode() + raw


class _Client(asyncio.Protocol):
    def __init__(self) -> None:
        import httptools

        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future[int] | None = None
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError("connection lost"))

    def on_message_begin(self) -> None:
        self.body = []

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(self.parser.get_status_code())


async def drive(conns: list[_Client], req: bytes, n: int, stream: bool) -> list[float]:
    """n requests over the connections (one in flight on each); latencies in seconds."""
    loop = asyncio.get_running_loop()
    left = [n]
    latencies: list[float] = []

    async def worker(conn: _Client) -> None:
        while left[0] > 0:
            left[0] -= 1
            conn.done = loop.create_future()
            t0 = time.perf_counter()
            assert conn.transport is not None
            conn.transport.write(req)
            status = await asyncio.wait_for(conn.done, 30)
            latencies.append(time.perf_counter() - t0)
            body = b"".join(conn.body)
            ok = status == 200 and (body.endswith(b"data: [DONE]\n\n") if stream else b'"usage"' in body)
            if not ok:
                raise SystemExit(f"bad answer {status}: {body[:300]!r}")

    async with asyncio.timeout(BATCH_DEADLINE):
        await asyncio.gather(*(worker(c) for c in conns))
    return latencies


def cpu_seconds(pid: int) -> float:
    """CPU time of every thread of `pid` so far, in ns resolution (the scheduler's own count,
    /proc/PID/task/*/schedstat; psutil's user + system time moves in 10 ms ticks)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/task/{task}/schedstat") as f:
            total += int(f.read().split()[0])
    return total / 1e9


def start_sampler(args: argparse.Namespace, pid: int, out: str) -> subprocess.Popen[bytes]:
    """py-spy sampling the proxy (on core 0) into `out` (collapsed stacks) until stopped."""
    cmd = ["taskset", "-c", args.upstream_cpus, args.py_spy, "record", "-p", str(pid), "-r", "1000",
           "--nonblocking", "-f", "raw", "--nolineno", "-o", out]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_sampler(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def print_samples(path: str, top: int) -> None:
    """Own (leaf) and inclusive sample shares per function from py-spy's collapsed stacks."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            if not stack:
                continue
            n = int(count)
            frames = stack.split(";")
            total += n
            own[frames[-1]] = own.get(frames[-1], 0) + n
            for fr in set(frames):
                incl[fr] = incl.get(fr, 0) + n
    print(f"  {total} samples; own time:")
    for fr, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        print(f"    {100 * n / total:5.1f} %  {fr}")
    print("  inclusive (proxy code):")
    ours = [(fr, n) for fr, n in incl.items() if "proxy/" in fr and "site-packages" not in fr]
    for fr, n in sorted(ours, key=lambda kv: -kv[1])[:top]:
        print(f"    {100 * n / total:5.1f} %  {fr}")


async def measure(
    args: argparse.Namespace, targets: list[Target], phase: str, c: int, n: int, files: list[str]
):
    """`--reps` measured batches of n requests per target, alternating; CPU s/request each."""
    stream = phase.startswith("stream")
    req = request_bytes(stream)
    first = targets[0]
    for t in targets:  # warm-up
        async with connected(t, c) as conns:
            await drive(conns, req, max(n // 5, 50), stream)
    for rep in range(args.reps):
        last = rep == args.reps - 1
        for i in range(len(targets)):
            t = targets[(i + rep) % len(targets)]
            watch = last and t is first and bool(files)
            # fresh connections per batch (an idle one may have been closed meanwhile: our
            # proxy's header_timeout), warmed with a few requests before the measured ones
            async with connected(t, c) as conns:
                await drive(conns, req, 2 * c, stream)
                await batch(args, t, conns, req, n, stream, f"{phase}/c{c}", files if watch else [])
        line = ", ".join(f"{t.name} {t.cpu[f'{phase}/c{c}'][-1] * 1e6:.1f}" for t in targets)
        print(f"    rep {rep + 1}: us CPU/request: {line}", flush=True)


@contextlib.asynccontextmanager
async def connected(t: Target, c: int) -> AsyncIterator[list[_Client]]:
    loop = asyncio.get_running_loop()
    conns = [(await loop.create_connection(_Client, "127.0.0.1", t.port))[1] for _ in range(c)]
    try:
        yield conns
    finally:
        for conn in conns:
            if conn.transport is not None:
                conn.transport.close()


async def batch(args: argparse.Namespace, t: Target, conns: list[_Client], req: bytes, n: int, stream: bool,
                key: str, files: list[str]) -> None:  # fmt: skip
    """One measured batch against `t`; `files`: [cProfile dump] and/or [py-spy output] to make."""
    assert t.proc is not None
    pid = t.proc.pid
    sampler = None
    if args.profile and files:
        os.kill(pid, signal.SIGUSR1)
    if args.sample and files:
        sampler = start_sampler(args, pid, files[-1])
        await asyncio.sleep(1.0)  # py-spy attaches
    cpu0 = cpu_seconds(pid)
    lat = await drive(conns, req, n, stream)
    cpu1 = cpu_seconds(pid)
    if sampler is not None:
        stop_sampler(sampler)
    if args.profile and files:
        os.kill(pid, signal.SIGUSR2)
        await asyncio.sleep(1.0)  # the dump
    t.cpu.setdefault(key, []).append((cpu1 - cpu0) / n)
    t.p50.setdefault(key, []).append(statistics.median(lat))


def summarize(targets: list[Target], c: int, k1: int, k2: int, pick: Any) -> dict[str, dict[str, float]]:
    """Per target: CPU µs per non-streaming request, per chunk and per stream (fixed part)."""
    out: dict[str, dict[str, float]] = {}
    for t in targets:
        row: dict[str, float] = {}
        if f"nonstream/c{c}" in t.cpu:
            row["nonstream_us"] = pick(t.cpu[f"nonstream/c{c}"]) * 1e6
            row["p50_ms"] = statistics.median(t.p50[f"nonstream/c{c}"]) * 1e3
        s1, s2 = t.cpu.get(f"stream/{k1}/c{c}"), t.cpu.get(f"stream/{k2}/c{c}")
        if s1 and s2:
            row["stream_us"] = pick(s1) * 1e6
            row["per_chunk_us"] = (pick(s2) - pick(s1)) * 1e6 / (k2 - k1)
            row["stream_fixed_us"] = row["stream_us"] - k1 * row["per_chunk_us"]
        out[t.name] = row
    return out


def paired(targets: list[Target], key: str) -> dict[str, list[float]]:
    """Each repetition's CPU per request of every target over the first target's."""
    base = targets[0].cpu.get(key, [])
    return {t.name: [x / y for x, y in zip(t.cpu.get(key, []), base, strict=False)] for t in targets[1:]}


def print_profile(path: str, top: int) -> None:
    stats = pstats.Stats(path)
    stats.sort_stats("tottime").print_stats(top)


def main() -> int:
    if sys.argv[1:2] == ["--serve-profiled"]:  # the profiled proxy: OUT -- <serve arguments>
        return serve_profiled(sys.argv[2], sys.argv[4:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "targets", nargs="*", help="NAME=TREE (together-meter source tree) or naive; default ours=."
    )
    p.add_argument("--python", default=sys.executable, help="interpreter for together-meter")
    p.add_argument(
        "--shared",
        type=Path,
        default=Path(os.environ.get("SHARED_BENCH", ROOT.parent / "shared" / "bench")),
        help="the shared harness (default $SHARED_BENCH, else ../shared/bench)",
    )
    p.add_argument("--bench-python", default=os.path.expanduser("~/.cache/meter-bench/venv/bin/python"))
    p.add_argument("--concurrency", default="32 1", help="space-separated levels")
    p.add_argument(
        "-n", type=int, default=4000, help="measured non-streaming requests per batch (c=1: a quarter)"
    )
    p.add_argument("--streams", type=int, default=800, help="measured streams per batch (c=1: a quarter)")
    p.add_argument("--chunks", default="20 100", help="two stream lengths (chunks) for the per-chunk slope")
    p.add_argument("--chunk-delay-ms", type=float, default=1.0)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--modes", default="nonstream stream")
    p.add_argument("--proxy-cpus", default="1")
    p.add_argument("--upstream-cpus", default="0")
    p.add_argument("--profile", default="", help="cProfile the first target into this file (.1, .2, ...)")
    p.add_argument("--sample", default="", help="py-spy the first target into this file (.1, .2, ...)")
    p.add_argument("--py-spy", default=os.path.expanduser("~/.cache/meter-bench/venv/bin/py-spy"))
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--json-out", default="", help="append the results as one JSON line here")
    args = p.parse_args()
    targets = parse_targets(args.targets)
    if args.profile and targets[0].src is None:
        p.error("--profile needs a together-meter target first")
    with contextlib.suppress(OSError, ValueError):  # the driver shares core 0 with the upstream
        os.sched_setaffinity(0, {int(c) for c in args.upstream_cpus.split(",")})
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    k1, k2 = (int(x) for x in args.chunks.split())
    levels = [int(c) for c in args.concurrency.split()]
    result: dict[str, Any] = {"load_before": os.getloadavg(), "targets": {t.name: t.src for t in targets}}
    for t in targets:
        if t.src is not None:
            with contextlib.suppress(subprocess.CalledProcessError):
                got = subprocess.run(["git", "-C", t.src, "describe", "--always", "--dirty"],
                                     capture_output=True, text=True, check=True)  # fmt: skip
                result.setdefault("commits", {})[t.name] = got.stdout.strip()
    files = run_phases(args, targets, levels, k1, k2)
    result["load_after"] = os.getloadavg()
    report(args, targets, levels, k1, k2, result)
    for i, (kind, name) in enumerate(files, 1):
        print(f"\n=== {kind} of {targets[0].name}, {name} ===")
        if kind == "py-spy":
            print_samples(f"{args.sample}.{i}", args.top)
        else:
            print_profile(f"{args.profile}.{i}", args.top)
    return 0


def run_phases(args: argparse.Namespace, targets: list[Target], levels: list[int], k1: int, k2: int):
    """Start everything, measure every phase, stop everything; the profiles made, in order."""
    phases = (["nonstream"] if "nonstream" in args.modes.split() else []) + (
        [f"stream/{k1}", f"stream/{k2}"] if "stream" in args.modes.split() else []
    )
    made: list[tuple[str, str]] = []
    upstream, chunks_now = None, None
    with tempfile.TemporaryDirectory(prefix="meter-profile.") as work:
        try:
            for phase in phases:
                chunks = int(phase.split("/")[1]) if "/" in phase else k1
                if chunks != chunks_now:
                    stop(upstream)
                    upstream, chunks_now = start_upstream(args, chunks), chunks
                for i, t in enumerate(targets):
                    if t.proc is None:
                        start_proxy(args, t, work, profiled=bool(args.profile) and i == 0)
                for c in levels:
                    n = args.n if phase == "nonstream" else args.streams
                    n = max(n // 4, 100) if c == 1 else n
                    print(f"{phase} c={c} n={n}", flush=True)
                    files = []
                    if args.profile or args.sample:
                        made.append(("py-spy" if args.sample else "cProfile", f"{phase} c={c}"))
                        files = [f"{args.sample or args.profile}.{len(made)}"]
                    asyncio.run(measure(args, targets, phase, c, n, files))
        finally:
            for t in targets:
                stop(t.proc)
            stop(upstream)
    return made


def report(args: argparse.Namespace, targets: list[Target], levels: list[int], k1: int, k2: int,
           result: dict[str, Any]) -> None:  # fmt: skip
    for stat, pick in (("minimum", min), ("median", statistics.median)):
        print(f"\nCPU of each proxy process, {stat} of {args.reps} repetitions (us)")
        for c in levels:
            for name, row in summarize(targets, c, k1, k2, pick).items():
                result.setdefault(stat, {}).setdefault(f"c{c}", {})[name] = row
                parts = []
                if "nonstream_us" in row:
                    parts.append(
                        f"non-streaming {row['nonstream_us']:.1f}/request (p50 {row['p50_ms']:.3f} ms)"
                    )
                if "per_chunk_us" in row:
                    parts.append(f"stream {row['stream_us']:.1f} = {row['per_chunk_us']:.2f}/chunk x {k1} "
                                 f"+ {row['stream_fixed_us']:.1f}")  # fmt: skip
                print(f"  c={c} {name}: {'; '.join(parts)}")
    if len(targets) > 1:
        print(f"\npaired: each repetition's CPU per request over {targets[0].name}'s (median)")
        for key in targets[0].cpu:
            for name, ratios in paired(targets, key).items():
                result.setdefault("paired", {}).setdefault(key, {})[name] = ratios
                each = ", ".join(f"{r:.3f}" for r in ratios)
                print(f"  {key} {name}: {each} -> {statistics.median(ratios):.3f}")
    print(f"\nload average before {result['load_before']}, after {result['load_after']}")
    if args.json_out:
        with open(args.json_out, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    sys.exit(main())
