"""Rows per ledger commit for each target, nonstream and stream/20, at given concurrency."""
import argparse, asyncio, os, sys, tempfile, urllib.request, re
sys.path.insert(0, "/work/wt/perf2/bench")
import profile_path as pp

def scrape(t):
    txt = urllib.request.urlopen(f"http://127.0.0.1:{t.port+1}/metrics", timeout=5).read().decode()
    rows = float(re.search(r"^together_meter_ledger_rows_written_total (\S+)", txt, re.M).group(1))
    commits = float(re.search(r"^together_meter_ledger_commit_seconds_count (\S+)", txt, re.M).group(1))
    return rows, commits

async def main():
    p = argparse.ArgumentParser()
    p.add_argument("targets", nargs="*")
    p.add_argument("--c", default="32 8 2")
    a = p.parse_args()
    args = argparse.Namespace(shared=__import__("pathlib").Path("/work/shared/bench"),
        bench_python=os.path.expanduser("~/.cache/meter-bench/venv/bin/python"), upstream_cpus="0",
        proxy_cpus="1", chunk_delay_ms=1.0, python="/work/main/.venv/bin/python", profile="")
    targets = pp.parse_targets(a.targets)
    up = pp.start_upstream(args, 20)
    work = tempfile.mkdtemp()
    try:
        for t in targets:
            pp.start_proxy(args, t, work, False)
        for c in [int(x) for x in a.c.split()]:
            for stream in (False, True):
                req = pp.request_bytes(stream)
                n = 2000 if not stream else 600
                for t in targets:
                    async with pp.connected(t, c) as conns:
                        await pp.drive(conns, req, 2 * c, stream)
                        r0, c0 = scrape(t)
                        cpu0 = pp.cpu_seconds(t.proc.pid)
                        await pp.drive(conns, req, n, stream)
                        cpu1 = pp.cpu_seconds(t.proc.pid)
                        r1, c1 = scrape(t)
                    print(f"c={c} {'stream' if stream else 'nonstream'} {t.name}: rows/commit {(r1-r0)/(c1-c0):.2f}"
                          f" commits/request {(c1-c0)/n:.2f}  cpu/request {(cpu1-cpu0)/n*1e6:.0f} us", flush=True)
    finally:
        for t in targets:
            pp.stop(t.proc)
        pp.stop(up)

asyncio.run(main())
