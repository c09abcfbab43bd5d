-- together-meter ledger on PostgreSQL, schema version 6: `requests` in monthly partitions
-- (docs/ledger.md#monthly-partitions). LIST partitions on `period` (the month every report,
-- account, rollup and prune names), one table per month, `requests_YYYY_MM`; no DEFAULT partition.
-- The rows are copied once, here, with the table locked (no write can slip between the copy and
-- the swap); columns, defaults, indexes, owner and privileges are taken from the table as it is,
-- whatever earlier migrations gave it. The rollups, accounts and meta are not touched.
--
-- The primary key of a partitioned table must hold the partition key: (request_id, period).
-- A request id stays in one partition: trigger `requests_one_period` skips the insert of a
-- terminal row whose id is in the ledger under another period (as ON CONFLICT DO NOTHING skips it
-- under the same one), serialised per id by an advisory lock, so two transactions cannot both
-- insert it. Begins (`in_flight` rows, ids just minted by the proxy) do not pay for the check.
-- `requests_partition(period)` makes a month's partition: SECURITY DEFINER, so a proxy whose
-- database user does not own `requests` can still make the next month's (proxy/ledger/pg_partitions.py).

SELECT pg_advisory_xact_lock(7312667114020160006);  -- pg_partitions.PARTITION_LOCK: no partition made meanwhile
LOCK TABLE requests IN ACCESS EXCLUSIVE MODE;

DO $migration$
DECLARE
    zone text := COALESCE(NULLIF(current_setting('together_meter.timezone', true), ''), 'UTC');
    this_month date := date_trunc('month', now() AT TIME ZONE zone)::date;
    owner_name name := (SELECT r.rolname FROM pg_class AS c JOIN pg_roles AS r ON r.oid = c.relowner
                        WHERE c.oid = 'requests'::regclass);
    schema_name name := (SELECT n.nspname FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
                         WHERE c.oid = 'requests'::regclass);
    index_sql text[] := ARRAY(
        SELECT pg_get_indexdef(i.indexrelid) FROM pg_index AS i
        WHERE i.indrelid = 'requests'::regclass AND NOT i.indisprimary ORDER BY i.indexrelid);
    grants text[] := ARRAY(
        SELECT format('GRANT %s ON %I.requests TO %s%s', a.privilege_type, schema_name,
                      CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(g.rolname) END,
                      CASE WHEN a.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END)
        FROM pg_class AS c CROSS JOIN LATERAL aclexplode(c.relacl) AS a
        LEFT JOIN pg_roles AS g ON g.oid = a.grantee
        WHERE c.oid = 'requests'::regclass AND a.grantee <> c.relowner);
    p text;
    s text;
BEGIN
    EXECUTE format('CREATE TABLE %I.requests_by_month (LIKE %I.requests INCLUDING DEFAULTS '
                   'INCLUDING CONSTRAINTS INCLUDING STORAGE INCLUDING COMMENTS) PARTITION BY LIST (period)',
                   schema_name, schema_name);
    FOR p IN
        SELECT DISTINCT period FROM requests
        UNION SELECT to_char(this_month, 'YYYY-MM')
        UNION SELECT to_char(this_month + interval '1 month', 'YYYY-MM')
    LOOP
        EXECUTE format('CREATE TABLE %I.%I PARTITION OF %I.requests_by_month FOR VALUES IN (%L)',
                       schema_name, 'requests_' || translate(p, '-', '_'), schema_name, p);
        EXECUTE format('ALTER TABLE %I.%I OWNER TO %I', schema_name, 'requests_' || translate(p, '-', '_'),
                       owner_name);
    END LOOP;
    EXECUTE format('INSERT INTO %I.requests_by_month SELECT * FROM %I.requests', schema_name, schema_name);
    EXECUTE format('DROP TABLE %I.requests', schema_name);
    EXECUTE format('ALTER TABLE %I.requests_by_month RENAME TO requests', schema_name);
    EXECUTE format('ALTER TABLE %I.requests OWNER TO %I', schema_name, owner_name);
    FOREACH s IN ARRAY grants LOOP
        EXECUTE s;
    END LOOP;
    EXECUTE format('ALTER TABLE %I.requests ADD CONSTRAINT requests_pkey PRIMARY KEY (request_id, period)',
                   schema_name);
    FOREACH s IN ARRAY index_sql LOOP  -- the same definitions, now partitioned indexes
        EXECUTE s;
    END LOOP;

    EXECUTE format($f$
        CREATE FUNCTION %1$I.requests_one_period() RETURNS trigger LANGUAGE plpgsql AS $body$
        BEGIN
            -- at most 256 locks per transaction (a whole import), held to its end
            PERFORM pg_advisory_xact_lock(1414353489, hashtext(NEW.request_id) & 255);
            IF EXISTS (SELECT 1 FROM %1$I.requests WHERE request_id = NEW.request_id AND period <> NEW.period) THEN
                RETURN NULL;  -- the request is in the ledger under another period: that row stays
            END IF;
            RETURN NEW;
        END $body$$f$, schema_name);
    EXECUTE format('CREATE TRIGGER requests_one_period BEFORE INSERT ON %I.requests FOR EACH ROW '
                   'WHEN (NEW.status <> ''in_flight'') EXECUTE FUNCTION %I.requests_one_period()',
                   schema_name, schema_name);

    EXECUTE format($f$
        CREATE FUNCTION %1$I.requests_partition(p text) RETURNS boolean
        LANGUAGE plpgsql SECURITY DEFINER SET search_path = %1$I, pg_temp AS $body$
        DECLARE
            part text := 'requests_' || translate(p, '-', '_');
        BEGIN
            IF p IS NULL OR p !~ '^[0-9]{4}-(0[1-9]|1[0-2])$' THEN
                RAISE EXCEPTION 'not a period (YYYY-MM): %%', p USING ERRCODE = '22023';
            END IF;
            PERFORM pg_advisory_xact_lock(7312667114020160006);
            IF EXISTS (SELECT 1 FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid
                       WHERE i.inhparent = 'requests'::regclass
                       AND pg_get_expr(c.relpartbound, c.oid) = format('FOR VALUES IN (%%L)', p)) THEN
                RETURN false;
            END IF;
            -- made apart, then attached: ATTACH locks `requests` in SHARE UPDATE EXCLUSIVE mode,
            -- which no reader or writer waits for (CREATE TABLE ... PARTITION OF would lock them out)
            EXECUTE format('CREATE TABLE IF NOT EXISTS %%I (LIKE requests INCLUDING DEFAULTS '
                           'INCLUDING CONSTRAINTS INCLUDING STORAGE)', part);
            EXECUTE format('ALTER TABLE requests ATTACH PARTITION %%I FOR VALUES IN (%%L)', part, p);
            RETURN true;
        END $body$$f$, schema_name);
    EXECUTE format('ALTER FUNCTION %I.requests_partition(text) OWNER TO %I', schema_name, owner_name);
    EXECUTE format('ALTER FUNCTION %I.requests_one_period() OWNER TO %I', schema_name, owner_name);
END
$migration$;

ANALYZE requests;
