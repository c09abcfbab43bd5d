-- together-meter ledger on PostgreSQL, schema version 8: video jobs followed to their end.
-- together bills a video job when it completes (never a failed one): the proxy remembers each job
-- a tenant creates and records its ledger row (`video_<id>`) when it sees the job's end
-- (proxy/server/videos.py). Until then `reserved_pusd` counts against the tenant's budget.

CREATE TABLE IF NOT EXISTS video_jobs (
    video_id TEXT COLLATE "C" PRIMARY KEY,
    tenant TEXT NOT NULL,
    key_id TEXT NOT NULL,
    model TEXT NOT NULL,
    feature TEXT,
    environment TEXT,
    created_us BIGINT NOT NULL,
    request_id TEXT NOT NULL,
    reserved_pusd BIGINT,
    seconds_micros BIGINT,
    status TEXT NOT NULL,
    recorded_us BIGINT
);
CREATE INDEX IF NOT EXISTS video_jobs_open ON video_jobs (created_us) WHERE recorded_us IS NULL;
