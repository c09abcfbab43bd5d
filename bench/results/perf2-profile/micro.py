"""Per-commit cost of the ledger's begin and finish on a scratch SQLite ledger, schema variants."""
import os, sys, time, tempfile, sqlite3, asyncio, statistics
sys.path.insert(0, sys.argv[1])
from proxy.ledger.sqlite import SQLiteLedger, _INSERT_BEGIN, _UPDATE_FINISH, _finish_values
from proxy.ledger import LedgerRow, now_us, period_of

def rows(n):
    out = []
    for i in range(n):
        now = now_us()
        r = LedgerRow(f"req_{now:013x}{i:012x}", "acme", "k", "meta-llama/Llama-3.3-70B-Instruct-Turbo", "chat",
                      "serverless", None, None, False, now, period_of(now), reserved_pusd=123456789)
        t = r.terminal("ok", upstream_status=200, prompt_tokens=200, completion_tokens=64, cached_tokens=0,
                       usage_source="upstream", cost_pusd=987654, stream_complete=True, upstream_id="abc")
        out.append((r, t))
    return out

async def run(variant, n=3000):
    d = tempfile.mkdtemp()
    led = SQLiteLedger(os.path.join(d, "l.db"))
    await led.open()
    conn = led._conn
    for stmt in variant:
        conn.execute(stmt)
    rs = rows(n + 2000)
    # warm: 2000
    for r, t in rs[:2000]:
        led._write([("begin", r, None)]); led._write([("finish", t, None)])
    tb = tf = 0.0
    c0 = time.process_time()
    for r, t in rs[2000:]:
        a = time.perf_counter(); led._write([("begin", r, None)]); b = time.perf_counter()
        led._write([("finish", t, None)]); c = time.perf_counter()
        tb += b - a; tf += c - b
    c1 = time.process_time()
    await led.close()
    return tb / n * 1e6, tf / n * 1e6, (c1 - c0) / n * 1e6

VARIANTS = {
    "as is": [],
    "no in_flight index": ["DROP INDEX requests_in_flight"],
    "no period_tenant index": ["DROP INDEX requests_period_tenant"],
    "no rollup trigger": ["DROP TRIGGER rollup_finished"],
    "no indexes": ["DROP INDEX requests_in_flight", "DROP INDEX requests_period_tenant"],
    "none of them": ["DROP INDEX requests_in_flight", "DROP INDEX requests_period_tenant", "DROP TRIGGER rollup_finished"],
}
async def main():
    res = {k: [] for k in VARIANTS}
    for rep in range(int(sys.argv[2]) if len(sys.argv) > 2 else 3):
        for k, v in VARIANTS.items():
            res[k].append(await run(v))
    for k, v in res.items():
        print(f"{k:28s} begin {min(x[0] for x in v):6.1f}  finish {min(x[1] for x in v):6.1f}  cpu/pair {min(x[2] for x in v):6.1f} us (min of {len(v)})")
asyncio.run(main())
