-- together-meter ledger on PostgreSQL, schema version 5: dedicated endpoints by the minute
-- (docs/ledger.md#endpoint_minutes). One line per endpoint and minute: what the follower saw
-- running and what together bills for it (replicas x the hardware's cents per minute). The key
-- makes a minute count once across restarts and replicas; when two observations of a minute
-- differ the larger stays (proxy/ledger/endpoint_minutes.py). Money in pico-USD.

CREATE TABLE endpoint_minutes (
    endpoint_id TEXT COLLATE "C" NOT NULL,
    minute_start BIGINT NOT NULL,  -- µs since the epoch (UTC), the minute's first instant
    period TEXT COLLATE "C" NOT NULL,  -- YYYY-MM in budgets.timezone, as requests.period
    name TEXT NOT NULL,
    model TEXT NOT NULL,
    hardware TEXT NOT NULL,
    state TEXT NOT NULL,
    replicas INTEGER,  -- running replicas; NULL: the endpoint object did not tell (never guessed)
    min_replicas INTEGER,
    max_replicas INTEGER,
    cents_per_minute NUMERIC,  -- the hardware's price as together published it; NULL: unknown
    cost_pusd BIGINT,  -- replicas x cents_per_minute x 1e10, half-up; NULL: unknown
    cost_low_pusd BIGINT,  -- bounds of an unknown cost (equal to it when known)
    cost_high_pusd BIGINT,
    observed_us BIGINT NOT NULL,
    PRIMARY KEY (endpoint_id, minute_start)
);
CREATE INDEX endpoint_minutes_period ON endpoint_minutes (period, endpoint_id);
