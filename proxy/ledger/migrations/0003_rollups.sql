-- together-meter ledger on PostgreSQL, schema version 3: rollups (docs/ledger.md#rollups).
-- Exact daily sums of the terminal rows per (period, day, tenant, model, feature, environment,
-- mode, endpoint, status, usage_source), kept by the writer in the same statement that makes a
-- row terminal. Reports, budgets and estimates read them instead of the rows. The day is cut in
-- budgets.timezone (passed by the migrating process as together_meter.timezone; UTC without).
-- Filled here from the rows, and from `aggregates` (what `db prune` kept before), then dropped.

CREATE TABLE rollups (
    period TEXT COLLATE "C" NOT NULL,
    day TEXT COLLATE "C" NOT NULL,
    tenant TEXT COLLATE "C" NOT NULL,
    model TEXT COLLATE "C" NOT NULL,
    feature TEXT COLLATE "C" NOT NULL,  -- '' for none
    environment TEXT COLLATE "C" NOT NULL,  -- '' for none
    mode TEXT COLLATE "C" NOT NULL,
    endpoint TEXT COLLATE "C" NOT NULL,
    status TEXT COLLATE "C" NOT NULL,
    usage_source TEXT COLLATE "C" NOT NULL,
    requests BIGINT NOT NULL,
    with_usage BIGINT NOT NULL,
    input_tokens NUMERIC NOT NULL,
    output_tokens NUMERIC NOT NULL,
    cached_tokens NUMERIC NOT NULL,
    priced BIGINT NOT NULL,
    cost_pusd NUMERIC NOT NULL,  -- exact, unbounded
    estimated BIGINT NOT NULL,
    cost_unknown BIGINT NOT NULL,
    PRIMARY KEY (period, day, tenant, model, feature, environment, mode, endpoint, status, usage_source)
);

-- key -> value facts about this ledger: rollup_timezone, pruned:YYYY-MM (periods `db prune` deleted rows of)
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta VALUES
    ('rollup_timezone', COALESCE(NULLIF(current_setting('together_meter.timezone', true), ''), 'UTC'));

INSERT INTO rollups
SELECT period,
    to_char(to_timestamp(started_us / 1000000) AT TIME ZONE (SELECT value FROM meta WHERE key = 'rollup_timezone'),
            'YYYY-MM-DD'),
    tenant, model, COALESCE(feature, ''), COALESCE(environment, ''), mode, endpoint, status, usage_source,
    COUNT(*), COUNT(*) FILTER (WHERE prompt_tokens IS NOT NULL OR completion_tokens IS NOT NULL),
    COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0), COALESCE(SUM(cached_tokens), 0),
    COUNT(cost_pusd), COALESCE(SUM(cost_pusd), 0), COUNT(*) FILTER (WHERE usage_source = 'estimated'),
    COUNT(*) - COUNT(cost_pusd)
FROM requests WHERE status <> 'in_flight'
GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10;

INSERT INTO rollups AS r
SELECT period, day, tenant, model, feature, environment, mode, endpoint, status, usage_source,
    requests, with_usage, input_tokens, output_tokens, 0, priced, cost_pusd,
    CASE WHEN usage_source = 'estimated' THEN requests ELSE 0 END, requests - priced
FROM aggregates
ON CONFLICT (period, day, tenant, model, feature, environment, mode, endpoint, status, usage_source) DO UPDATE SET
    requests = r.requests + excluded.requests, with_usage = r.with_usage + excluded.with_usage,
    input_tokens = r.input_tokens + excluded.input_tokens, output_tokens = r.output_tokens + excluded.output_tokens,
    priced = r.priced + excluded.priced, cost_pusd = r.cost_pusd + excluded.cost_pusd,
    estimated = r.estimated + excluded.estimated, cost_unknown = r.cost_unknown + excluded.cost_unknown;

-- the months `db prune` deleted rows of: their sums are in the rollups, `db import` skips them
INSERT INTO meta SELECT DISTINCT 'pruned:' || period, '1' FROM aggregates;

DROP TABLE aggregates;
