import os, sys, time, tempfile, asyncio
sys.path.insert(0, sys.argv[1])
from proxy.ledger.sqlite import SQLiteLedger
from micro_rows import rows
buf = bytearray(8 << 20)
junk = [dict(a=i, b=str(i)) for i in range(60000)]
def thrash(mode):
    if mode == "bytes":
        buf[::64] = bytes(len(buf[::64]))  # touch 8 MB, one byte per cache line
    elif mode == "python":
        s = 0
        for d in junk[::3]: s += d["a"]
async def run(mode, n=2000):
    d = tempfile.mkdtemp(); led = SQLiteLedger(os.path.join(d, "l.db")); await led.open()
    rs = rows(n + 1000)
    for r, t in rs[:1000]:
        led._write_row("begin", r); led._write_row("finish", t)
    tot = 0.0
    for r, t in rs[1000:]:
        thrash(mode)
        c0 = time.thread_time(); led._write_row("begin", r); tot += time.thread_time() - c0
        thrash(mode)
        c0 = time.thread_time(); led._write_row("finish", t); tot += time.thread_time() - c0
    await led.close(); return tot / (2 * n) * 1e6
async def main():
    for mode in ("none", "bytes", "python"):
        v = [await run(mode) for _ in range(3)]
        print(f"thrash {mode:7s}: cpu per lone write {min(v):6.1f} us")
asyncio.run(main())
