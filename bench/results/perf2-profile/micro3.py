import os, tempfile, sqlite3, time
d = tempfile.mkdtemp(); p = os.path.join(d, "x.db")
c = sqlite3.connect(p, isolation_level=None)
c.execute("PRAGMA journal_mode=WAL"); c.execute("PRAGMA synchronous=NORMAL"); c.execute("PRAGMA wal_autocheckpoint=0")
c.execute("CREATE TABLE t (k TEXT PRIMARY KEY, v INTEGER) WITHOUT ROWID")
def bench(name, f, n=20000):
    for i in range(2000): f(i)
    t0 = time.process_time()
    for i in range(n): f(i + 10**6)
    print(f"{name:40s} {(time.process_time()-t0)/n*1e6:6.2f} us")
cur = c.cursor()
def empty(i):
    cur.execute("BEGIN IMMEDIATE"); cur.execute("COMMIT")
def deferred_empty(i):
    cur.execute("BEGIN"); cur.execute("COMMIT")
def one(i):
    cur.execute("BEGIN IMMEDIATE"); cur.execute("INSERT INTO t VALUES (?, ?)", (f"k{i:012d}", i)); cur.execute("COMMIT")
def autocommit(i):
    cur.execute("INSERT INTO t VALUES (?, ?)", (f"a{i:012d}", i))
def noop_exec(i):
    cur.execute("SELECT ?", (i,))
bench("BEGIN IMMEDIATE; COMMIT (empty)", empty)
bench("BEGIN; COMMIT (empty)", deferred_empty)
bench("one-row insert txn", one)
bench("one-row insert autocommit", autocommit)
bench("SELECT ? (python+stmt cache floor)", noop_exec)
