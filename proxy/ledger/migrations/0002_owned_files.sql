-- together-meter ledger on PostgreSQL, schema version 2: who owns which file (tenant isolation).
-- A file belongs to the tenant that uploaded it through the proxy, or whose batch produced it;
-- the first owner recorded stays (ownership never moves). Batches already name their tenant.

CREATE TABLE files (
    file_id TEXT COLLATE "C" PRIMARY KEY,
    tenant TEXT COLLATE "C" NOT NULL,
    key_id TEXT NOT NULL,
    created_us BIGINT NOT NULL,
    source TEXT NOT NULL,  -- upload | batch_output | batch_error
    batch_id TEXT COLLATE "C"
);
CREATE INDEX files_tenant ON files (tenant);

-- "which batches may this tenant see" without a scan
CREATE INDEX batches_tenant ON batches (tenant);
