import os, sys, time, tempfile, asyncio
sys.path.insert(0, sys.argv[1])
from proxy.ledger.sqlite import SQLiteLedger
from micro_rows import rows
async def run(fn, n=4000):
    d = tempfile.mkdtemp(); led = SQLiteLedger(os.path.join(d, "l.db")); await led.open()
    rs = rows(n + 2000)
    w = fn(led)
    for r, t in rs[:2000]: w("begin", r); w("finish", t)
    c0 = time.process_time()
    for r, t in rs[2000:]: w("begin", r); w("finish", t)
    c1 = time.process_time(); await led.close(); return (c1 - c0) / n * 1e6
V = {"_write([op]) (batch of one)": lambda led: (lambda k, r: led._write([(k, r, None)])),
     "_write_row (autocommit)": lambda led: led._write_row}
async def main():
    res = {k: [] for k in V}
    for _ in range(5):
        for k, f in V.items(): res[k].append(await run(f))
    for k, v in res.items(): print(f"{k:30s} cpu per begin+finish {min(v):6.1f} us (min of 5), median {sorted(v)[2]:6.1f}")
asyncio.run(main())
