-- together-meter ledger on PostgreSQL, schema version 7: dedicated endpoints priced by together's
-- v2 API (docs/estimating-costs.md#the-v2-source). A v2 minute stores the instance type's price
-- per replica-hour (`priceCentsPerHour`, exact) when the endpoint ran on one instance type; its
-- cost is sum(ready replicas x cents_per_hour x 1e10 / 60), rounded half-up once per minute row.
-- (Version 6 is the monthly partitions of the requests table.)

ALTER TABLE endpoint_minutes ADD COLUMN IF NOT EXISTS cents_per_hour NUMERIC;
