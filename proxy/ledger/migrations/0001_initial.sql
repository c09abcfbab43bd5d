-- together-meter ledger on PostgreSQL, schema version 1 (docs/ledger.md#postgresql).
-- Money per row is BIGINT pico-USD (1e-12 USD); sums over many rows are NUMERIC (exact, unbounded).
-- Text keys use the "C" collation so ordering is byte order, as in the SQLite ledger.

CREATE TABLE requests (
    request_id TEXT COLLATE "C" PRIMARY KEY,
    tenant TEXT COLLATE "C" NOT NULL,
    key_id TEXT NOT NULL,
    model TEXT COLLATE "C" NOT NULL,
    endpoint TEXT NOT NULL,
    mode TEXT NOT NULL,
    feature TEXT COLLATE "C",
    environment TEXT COLLATE "C",
    stream BOOLEAN NOT NULL,
    started_us BIGINT NOT NULL,
    finished_us BIGINT,
    period TEXT COLLATE "C" NOT NULL,
    upstream_status INTEGER,
    prompt_tokens BIGINT,
    completion_tokens BIGINT,
    cached_tokens BIGINT,
    reasoning_tokens BIGINT,
    usage_source TEXT NOT NULL,
    cost_pusd BIGINT,
    reserved_pusd BIGINT,
    status TEXT NOT NULL,
    stream_complete BOOLEAN NOT NULL DEFAULT FALSE,
    error_code TEXT,
    upstream_id TEXT,
    owner TEXT  -- instance_id of the process that began the row (NULL for rows recorded terminal)
);
CREATE INDEX requests_period_tenant ON requests (period, tenant);
CREATE INDEX requests_started ON requests (started_us, request_id);
CREATE INDEX requests_in_flight ON requests (owner) WHERE status = 'in_flight';

-- Budget accounts: the single truth of spend and reservations across replicas.
-- feature '' is the tenant as a whole. spent = costs of the period's terminal rows;
-- reserved = reservations of its in-flight rows.
CREATE TABLE accounts (
    tenant TEXT COLLATE "C" NOT NULL,
    feature TEXT COLLATE "C" NOT NULL,
    period TEXT COLLATE "C" NOT NULL,
    spent_pusd NUMERIC NOT NULL DEFAULT 0,
    reserved_pusd NUMERIC NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, feature, period)
);

-- One line per proxy process; a replica whose heartbeat is older than the lease is dead and
-- its in-flight rows are reaped by the others.
CREATE TABLE instances (
    instance_id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    started_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    heartbeat_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    stopped_at TIMESTAMPTZ
);

-- Budget webhook messages: claimed by one replica before sending, sent_us set once delivered.
CREATE TABLE notifications (
    tenant TEXT NOT NULL,
    feature TEXT NOT NULL,
    period TEXT NOT NULL,
    threshold TEXT NOT NULL,
    sent_us BIGINT,
    claimed_by TEXT,
    claimed_at TIMESTAMPTZ,
    PRIMARY KEY (tenant, feature, period, threshold)
);

CREATE TABLE batches (
    batch_id TEXT COLLATE "C" PRIMARY KEY,
    tenant TEXT NOT NULL,
    key_id TEXT NOT NULL,
    feature TEXT,
    environment TEXT,
    created_us BIGINT NOT NULL,
    status TEXT NOT NULL,
    output_file_id TEXT,
    recorded_us BIGINT
);
CREATE INDEX batches_open ON batches (created_us) WHERE recorded_us IS NULL;

-- What `db prune` folds old rows into (proxy/retention.py); '' stands for no feature / environment.
CREATE TABLE aggregates (
    period TEXT COLLATE "C" NOT NULL,
    day TEXT COLLATE "C" NOT NULL,
    tenant TEXT COLLATE "C" NOT NULL,
    model TEXT COLLATE "C" NOT NULL,
    endpoint TEXT COLLATE "C" NOT NULL,
    mode TEXT COLLATE "C" NOT NULL,
    feature TEXT COLLATE "C" NOT NULL,
    environment TEXT COLLATE "C" NOT NULL,
    status TEXT COLLATE "C" NOT NULL,
    usage_source TEXT COLLATE "C" NOT NULL,
    requests BIGINT NOT NULL,
    with_usage BIGINT NOT NULL,
    input_tokens NUMERIC NOT NULL,
    output_tokens NUMERIC NOT NULL,
    priced BIGINT NOT NULL,
    cost_pusd NUMERIC NOT NULL,
    PRIMARY KEY (period, day, tenant, model, endpoint, mode, feature, environment, status, usage_source)
);
