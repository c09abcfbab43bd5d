"""CPU time of the proxy process per request and per streamed chunk, and where it goes.

Throughput on a shared 2-core machine moves with whatever else runs; the CPU seconds the proxy
process spends on a fixed number of requests move much less. This script starts the harness's
fake upstream (../shared/bench/fake_together.py, core 0) and one proxy (core 1): together-meter
from a source tree (`--src`, default this checkout) with bench/config.yaml and a fresh SQLite
ledger, or the harness's naive proxy (`--target naive`). It then drives a fixed number of
requests at a fixed concurrency from this process (core 0; uvloop + httptools, one request in
flight per keep-alive connection) and reads the proxy's CPU time (all its threads, from
/proc/PID/task/*/schedstat) just before and after each measured batch.

Phases (each: warm-up requests, then N measured, repeated `--reps` times, median reported):
  nonstream          POST /v1/chat/completions, 1 KB body, JSON answer
  stream/K           the same with "stream": true; the upstream sends K chunks 1 ms apart
Per chunk = (CPU per stream at K2 - CPU per stream at K1) / (K2 - K1): the slope, free of the
per-request part; per-stream fixed part = CPU per stream at K1 - K1 x per chunk.

`--sample OUT` samples the proxy with py-spy (1 kHz, not pausing it) during the last measured
repetition of each phase and prints own and inclusive shares per function (OUT.1, OUT.2, ...).
`--profile OUT.prof` runs the proxy under cProfile, switched on for the measured requests only
(SIGUSR1 on, SIGUSR2 off and dump), and prints the top entries by own time. Profiled runs are
slower: read their CPU figures from an unprofiled run.

    .venv/bin/python bench/profile_path.py                        # this checkout, c=32 and c=1
    .venv/bin/python bench/profile_path.py --src /tmp/old-tree    # another commit's tree
    .venv/bin/python bench/profile_path.py --target naive         # the harness's naive proxy
    .venv/bin/python bench/profile_path.py --profile /tmp/ours.prof --reps 1

Loopback only; every phase is bounded (a per-request timeout and a deadline per batch).
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
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
UPSTREAM_PORT = 18400
PROXY_PORT = 18401
ADMIN_PORT = 18402
MODEL = "meta-llama/Llama-3.3-70B-Instruct-Turbo"
AUTH = "sk-bench-tenant-a"
BATCH_DEADLINE = 120.0  # seconds: a measured batch that takes longer is a failure


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
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=1) as r:  # noqa: S310 - loopback only
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


def start_proxy(args: argparse.Namespace, workdir: str) -> subprocess.Popen[bytes]:
    upstream = f"http://127.0.0.1:{UPSTREAM_PORT}/v1"
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("https_proxy", "http_proxy", "all_proxy")}
    if args.target == "naive":
        cmd = [args.bench_python, str(args.shared / "naive_proxy.py"), "--port", str(PROXY_PORT),
               "--upstream", upstream]  # fmt: skip
        ready = f"http://127.0.0.1:{PROXY_PORT}/metrics"
    else:
        src = str(Path(args.src).resolve())
        env.update(PYTHONPATH=src, TOGETHER_API_KEY="fake-together-key")
        serve = ["--log-level", "WARNING", "serve", "--port", str(PROXY_PORT), "--admin-port", str(ADMIN_PORT),
                 "--config", f"{src}/bench/config.yaml", "--upstream", upstream,
                 "--ledger", f"{workdir}/ledger.db"]  # fmt: skip
        if args.profile:
            cmd = [args.python, "-P", str(HERE / "profile_path.py"), "--serve-profiled", args.profile, "--", *serve]
        else:
            cmd = [args.python, "-P", "-c", "import sys; from proxy.cli import main; sys.exit(main())", *serve]
        ready = f"http://127.0.0.1:{ADMIN_PORT}/healthz"
    proc = subprocess.Popen(
        ["taskset", "-c", args.proxy_cpus, *cmd],
        cwd=args.src if args.target == "ours" else None,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(f"{workdir}/proxy.log", "wb"),  # noqa: SIM115 - closed with the process
    )
    _wait_http(ready, proc, args.target)
    return proc


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
        "messages": [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": ""}],
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
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{PROXY_PORT}\r\n"
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


async def measure(args: argparse.Namespace, pid: int, concurrency: int, n: int, stream: bool, sample: str):
    warmup, reps, profile = max(n // 5, 50), args.reps, bool(args.profile)
    loop = asyncio.get_running_loop()
    conns = []
    for _ in range(concurrency):
        _, c = await loop.create_connection(_Client, "127.0.0.1", PROXY_PORT)
        conns.append(c)
    req = request_bytes(stream)
    per_request, p50s = [], []
    try:
        for rep in range(reps):
            await drive(conns, req, warmup, stream)
            if profile and rep == reps - 1:
                os.kill(pid, signal.SIGUSR1)
            sampler = start_sampler(args, pid, sample) if sample and rep == reps - 1 else None
            if sampler is not None:
                await asyncio.sleep(1.0)  # py-spy attaches
            t = cpu_seconds(pid)
            wall = time.perf_counter()
            lat = await drive(conns, req, n, stream)
            wall = time.perf_counter() - wall
            t2 = cpu_seconds(pid)
            if sampler is not None:
                stop_sampler(sampler)
            if profile and rep == reps - 1:
                os.kill(pid, signal.SIGUSR2)
                await asyncio.sleep(1.0)  # the dump
            cpu = t2 - t
            per_request.append(cpu / n)
            p50s.append(statistics.median(lat))
            print(f"    rep {rep + 1}: {cpu / n * 1e6:8.1f} us CPU/request, {n / wall:8.1f} req/s, "
                  f"p50 {statistics.median(lat) * 1e3:.3f} ms", flush=True)  # fmt: skip
    finally:
        for c in conns:
            if c.transport is not None:
                c.transport.close()
    return statistics.median(per_request), statistics.median(p50s), per_request


def print_profile(path: str, top: int) -> None:
    stats = pstats.Stats(path)
    stats.sort_stats("tottime").print_stats(top)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", choices=("ours", "naive"), default="ours")
    p.add_argument("--src", default=str(ROOT), help="together-meter source tree (default: this checkout)")
    p.add_argument("--python", default=sys.executable, help="interpreter for together-meter")
    p.add_argument(
        "--shared",
        type=Path,
        default=Path(os.environ.get("SHARED_BENCH", ROOT.parent / "shared" / "bench")),
        help="the shared harness (default $SHARED_BENCH, else ../shared/bench)",
    )
    p.add_argument("--bench-python", default=os.path.expanduser("~/.cache/meter-bench/venv/bin/python"))
    p.add_argument("--concurrency", default="32 1", help="space-separated levels")
    p.add_argument("-n", type=int, default=4000, help="measured non-streaming requests per repetition")
    p.add_argument("--streams", type=int, default=800, help="measured streams per repetition")
    p.add_argument("--chunks", default="20 100", help="two stream lengths (chunks) for the per-chunk slope")
    p.add_argument("--chunk-delay-ms", type=float, default=1.0)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--modes", default="nonstream stream")
    p.add_argument("--proxy-cpus", default="1")
    p.add_argument("--upstream-cpus", default="0")
    p.add_argument("--profile", default="", help="cProfile the proxy (last repetition) into this file")
    p.add_argument("--sample", default="", help="py-spy the proxy (last repetition) into this file")
    p.add_argument("--py-spy", default=os.path.expanduser("~/.cache/meter-bench/venv/bin/py-spy"))
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--json-out", default="", help="append the results as one JSON line here")
    p.add_argument("--serve-profiled", default="", help=argparse.SUPPRESS)
    args, rest = p.parse_known_args()
    if args.serve_profiled:
        return serve_profiled(args.serve_profiled, [a for a in rest if a != "--"])
    if args.profile and args.target != "ours":
        p.error("--profile works with --target ours only")
    try:  # the driver shares core 0 with the upstream
        os.sched_setaffinity(0, {int(c) for c in args.upstream_cpus.split(",")})
    except (OSError, ValueError):
        pass
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    k1, k2 = (int(x) for x in args.chunks.split())
    levels = [int(c) for c in args.concurrency.split()]
    result: dict[str, object] = {"target": args.target, "src": args.src, "load_before": os.getloadavg()}
    if args.target == "ours":
        with contextlib.suppress(subprocess.CalledProcessError):
            result["commit"] = subprocess.run(
                ["git", "-C", args.src, "describe", "--always", "--dirty"], capture_output=True, text=True, check=True
            ).stdout.strip()
    phases: list[tuple[str, int]] = []
    profiled: list[str] = []
    sampled: list[str] = []
    if "nonstream" in args.modes:
        phases.append(("nonstream", k1))
    if "stream" in args.modes.split():
        phases += [("stream", k1), ("stream", k2)]
    with tempfile.TemporaryDirectory(prefix="meter-profile.") as work:
        proxy = None
        upstream_chunks = None
        upstream = None
        try:
            proxy_started = False
            for mode, chunks in phases:
                if upstream_chunks != chunks:
                    stop(upstream)
                    upstream = start_upstream(args, chunks)
                    upstream_chunks = chunks
                if not proxy_started:
                    proxy = start_proxy(args, work)
                    proxy_started = True
                for c in levels:
                    n = args.n if mode == "nonstream" else args.streams
                    if c == 1:
                        n = max(n // 4, 100)
                    label = mode if mode == "nonstream" else f"stream/{chunks}"
                    if args.profile:
                        profiled.append(f"{label} c={c}")
                    print(f"{label} c={c} n={n}", flush=True)
                    assert proxy is not None
                    sample = f"{args.sample}.{len(sampled) + 1}" if args.sample else ""
                    if sample:
                        sampled.append(f"{label} c={c}")
                    cpu, p50, each = asyncio.run(measure(args, proxy.pid, c, n, mode == "stream", sample))
                    result[f"{label}/c{c}"] = {"cpu_us": cpu * 1e6, "p50_ms": p50 * 1e3,
                                               "cpu_us_each": [x * 1e6 for x in each]}  # fmt: skip
        finally:
            stop(proxy)
            stop(upstream)
    result["load_after"] = os.getloadavg()
    print("\nsummary (median of repetitions; CPU of the proxy process)")
    for c in levels:
        ns = result.get(f"nonstream/c{c}")
        s1, s2 = result.get(f"stream/{k1}/c{c}"), result.get(f"stream/{k2}/c{c}")
        if ns:
            print(f"  c={c}: non-streaming {ns['cpu_us']:.1f} us/request, p50 {ns['p50_ms']:.3f} ms")  # type: ignore[index]
        if s1 and s2:
            per_chunk = (s2["cpu_us"] - s1["cpu_us"]) / (k2 - k1)  # type: ignore[index]
            fixed = s1["cpu_us"] - k1 * per_chunk  # type: ignore[index]
            result[f"per_chunk_us/c{c}"], result[f"stream_fixed_us/c{c}"] = per_chunk, fixed
            print(f"  c={c}: stream {s1['cpu_us']:.1f} us/stream of {k1} chunks, "  # type: ignore[index]
                  f"{s2['cpu_us']:.1f} of {k2}: {per_chunk:.2f} us/chunk + {fixed:.1f} us/stream")  # type: ignore[index]
    print(f"  load average before {result['load_before']}, after {result['load_after']}")
    if args.json_out:
        with open(args.json_out, "a") as f:
            f.write(json.dumps(result) + "\n")
    for i, name in enumerate(sampled, 1):
        print(f"\n=== py-spy samples of {name} ({args.sample}.{i}) ===")
        print_samples(f"{args.sample}.{i}", args.top)
    if args.profile:
        for i, name in enumerate(profiled, 1):
            print(f"\n=== profile of {name} (own time, {args.profile}.{i}) ===")
            print_profile(f"{args.profile}.{i}", args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
