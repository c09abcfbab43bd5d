import os, sys, time, tempfile, asyncio
sys.path.insert(0, sys.argv[1])
from proxy.ledger.sqlite import SQLiteLedger
from micro_rows import rows
async def run(k, n=4000):
    d = tempfile.mkdtemp(); led = SQLiteLedger(os.path.join(d, "l.db")); await led.open()
    rs = rows(n + 2000)
    def go(part):
        # interleave as at c=32: a batch holds k/2 begins of new rows and k/2 finishes of older ones
        pend = []
        for i in range(0, len(part), max(k // 2, 1)):
            grp = part[i:i + max(k // 2, 1)]
            ops = [("begin", r, None) for r, _ in grp] + [("finish", t, None) for _, t in pend]
            if k == 1:
                for op in ops: led._write([op])
            else:
                led._write(ops)
            pend = grp
        for _, t in pend: led._write([("finish", t, None)])
    go(rs[:2000])
    c0 = time.process_time(); go(rs[2000:]); c1 = time.process_time()
    await led.close(); return (c1 - c0) / n * 1e6
async def main():
    for k in (1, 2, 4, 8, 16):
        v = [await run(k) for _ in range(3)]
        print(f"batch of ~{k:2d} rows: cpu per request (begin+finish) {min(v):6.1f} us")
asyncio.run(main())
