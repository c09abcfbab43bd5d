-- together-meter ledger on PostgreSQL, schema version 4: rows priced per unit (issue 17).
-- Images, audio and video are billed by together in their own units (megapixels, images, seconds
-- of audio or video), not in tokens: a row says its `unit` ('token' for everything priced by the
-- token columns, every row so far) and, for the other units, its `quantity_micros` (the quantity
-- in millionths of the unit, exact). The rollups are kept by unit too and sum the quantities.
-- Adding a column with a constant default rewrites nothing (PostgreSQL 11+).

ALTER TABLE requests ADD COLUMN unit TEXT NOT NULL DEFAULT 'token';
ALTER TABLE requests ADD COLUMN quantity_micros BIGINT;

ALTER TABLE rollups ADD COLUMN unit TEXT COLLATE "C" NOT NULL DEFAULT 'token';
ALTER TABLE rollups ADD COLUMN quantity_micros NUMERIC NOT NULL DEFAULT 0;
ALTER TABLE rollups DROP CONSTRAINT rollups_pkey;
ALTER TABLE rollups
    ADD PRIMARY KEY (period, day, tenant, model, feature, environment, mode, endpoint, status, usage_source, unit);
