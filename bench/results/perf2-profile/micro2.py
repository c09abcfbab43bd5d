import os, sys, time, tempfile, sqlite3, asyncio
sys.path.insert(0, sys.argv[1])
import proxy.ledger.sqlite_schema as sch
from proxy.ledger.sqlite import SQLiteLedger
exec(open("/tmp/perf2/micro.py").read().split("VARIANTS = {")[0].split("def rows")[1].join(["def rows",""]) if False else "")
from micro_rows import rows
async def run(pre, post=(), n=3000):
    d = tempfile.mkdtemp(); path = os.path.join(d, "l.db")
    c = sqlite3.connect(path)
    for s in pre: c.execute(s)
    c.close()
    led = SQLiteLedger(path); await led.open()
    for s in post: led._conn.execute(s)
    rs = rows(n + 2000)
    for r, t in rs[:2000]:
        led._write([("begin", r, None)]); led._write([("finish", t, None)])
    c0 = time.process_time(); w0 = time.perf_counter()
    for r, t in rs[2000:]:
        led._write([("begin", r, None)]); led._write([("finish", t, None)])
    c1 = time.process_time(); w1 = time.perf_counter()
    await led.close()
    return (w1 - w0) / n * 1e6, (c1 - c0) / n * 1e6
V = {"4096 (default)": [], "1024": ["PRAGMA page_size=1024"], "2048": ["PRAGMA page_size=2048"], "8192": ["PRAGMA page_size=8192"]}
async def main():
    res = {k: [] for k in V}
    for _ in range(3):
        for k, v in V.items(): res[k].append(await run(v))
    for k, v in res.items():
        print(f"{k:16s} wall/pair {min(x[0] for x in v):6.1f}  cpu/pair {min(x[1] for x in v):6.1f}")
asyncio.run(main())
