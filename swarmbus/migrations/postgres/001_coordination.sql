-- swarmbus coordination state on PostgreSQL (the seed's "PostgreSQL-based coordination").
--
-- swarm_state is the authoritative copy of every StateStore key (bucket, key, value,
-- revision, expires_at); swarm_changes is the change log watches catch up from.
-- The seed's tables (agent_sessions, agent_findings, agent_tasks) keep the seed's
-- names and columns and are written in the same transaction as swarm_state for the
-- buckets named in swarm_projections, so plain SQL sees every finding and task.
-- Revisions come from one sequence; writes to one bucket hold a transaction-scoped
-- advisory lock, so a bucket's revisions commit in order (a watch that has read
-- revision N has seen every earlier change of that bucket).

CREATE SEQUENCE IF NOT EXISTS swarm_revision;

CREATE TABLE IF NOT EXISTS swarm_state (
  bucket     TEXT NOT NULL,
  key        TEXT COLLATE "C" NOT NULL,
  value      BYTEA NOT NULL,
  revision   BIGINT NOT NULL,
  expires_at TIMESTAMPTZ,
  updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
  PRIMARY KEY (bucket, key)
);
CREATE INDEX IF NOT EXISTS swarm_state_expiry ON swarm_state (bucket, expires_at)
  WHERE expires_at IS NOT NULL;

CREATE TABLE IF NOT EXISTS swarm_changes (
  revision BIGINT PRIMARY KEY,
  bucket   TEXT NOT NULL,
  key      TEXT COLLATE "C" NOT NULL,
  op       TEXT NOT NULL CHECK (op IN ('put', 'del', 'expire')),
  value    BYTEA,
  at       TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS swarm_changes_bucket ON swarm_changes (bucket, revision);
CREATE INDEX IF NOT EXISTS swarm_changes_at ON swarm_changes (at);

-- Which buckets are mirrored into the seed's tables, and how ('board' or 'tasks').
CREATE TABLE IF NOT EXISTS swarm_projections (
  bucket TEXT PRIMARY KEY,
  kind   TEXT NOT NULL CHECK (kind IN ('board', 'tasks'))
);
INSERT INTO swarm_projections VALUES ('SWARMBUS_BOARD', 'board'), ('swarmbus-tasks', 'tasks')
  ON CONFLICT DO NOTHING;

-- The seed's tables, verbatim, plus: name (the swarmbus session id), bucket/key (the
-- StateStore key a row mirrors), revision and expires_at.
CREATE TABLE IF NOT EXISTS agent_sessions (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  created_at TIMESTAMP DEFAULT NOW(),
  context JSONB NOT NULL,
  status VARCHAR(50) DEFAULT 'active',
  name TEXT UNIQUE NOT NULL,
  revision BIGINT
);

CREATE TABLE IF NOT EXISTS agent_findings (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  session_id UUID REFERENCES agent_sessions(id),
  agent_id VARCHAR(100) NOT NULL,
  finding_type VARCHAR(50) NOT NULL,
  content JSONB NOT NULL,
  confidence FLOAT,
  created_at TIMESTAMP DEFAULT NOW(),
  bucket TEXT NOT NULL,
  key TEXT COLLATE "C" NOT NULL,
  revision BIGINT NOT NULL,
  expires_at TIMESTAMPTZ,
  UNIQUE (bucket, key)
);
CREATE INDEX IF NOT EXISTS agent_findings_session ON agent_findings (session_id);

CREATE TABLE IF NOT EXISTS agent_tasks (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  session_id UUID REFERENCES agent_sessions(id),
  assigned_to VARCHAR(100),
  task_type VARCHAR(50) NOT NULL,
  parameters JSONB,
  status VARCHAR(50) DEFAULT 'pending',
  result JSONB,
  created_at TIMESTAMP DEFAULT NOW(),
  completed_at TIMESTAMP,
  bucket TEXT NOT NULL,
  key TEXT COLLATE "C" NOT NULL,
  revision BIGINT NOT NULL,
  expires_at TIMESTAMPTZ,
  UNIQUE (bucket, key)
);
CREATE INDEX IF NOT EXISTS agent_tasks_session ON agent_tasks (session_id);

-- An RFC 3339 time in a JSON field as a UTC TIMESTAMP (NULL if absent or not a time).
CREATE OR REPLACE FUNCTION swarm_utc(v TEXT) RETURNS TIMESTAMP
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
  RETURN v::timestamptz AT TIME ZONE 'UTC';
EXCEPTION WHEN others THEN
  RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION swarm_session(p_name TEXT) RETURNS UUID
LANGUAGE plpgsql AS $$
DECLARE sid UUID;
BEGIN
  INSERT INTO agent_sessions (name, context) VALUES (p_name, '{}'::jsonb)
    ON CONFLICT (name) DO NOTHING;
  SELECT id INTO sid FROM agent_sessions WHERE name = p_name;
  RETURN sid;
END $$;

-- Mirror one write (p_value NULL: a delete) of a projected bucket into the seed's tables.
-- A value that is not the JSON the projection expects is left unmirrored, never refused.
CREATE OR REPLACE FUNCTION swarm_project(
  p_bucket TEXT, p_key TEXT, p_value BYTEA, p_revision BIGINT, p_expires TIMESTAMPTZ
) RETURNS VOID LANGUAGE plpgsql AS $$
DECLARE
  kind TEXT;
  parts TEXT[];
  v JSONB;
  sid UUID;
BEGIN
  SELECT p.kind INTO kind FROM swarm_projections p WHERE p.bucket = p_bucket;
  IF kind IS NULL THEN RETURN; END IF;
  parts := string_to_array(p_key, '.');
  IF p_value IS NULL THEN
    DELETE FROM agent_findings WHERE bucket = p_bucket AND key = p_key;
    DELETE FROM agent_tasks WHERE bucket = p_bucket AND key = p_key;
    RETURN;
  END IF;
  BEGIN
    v := convert_from(p_value, 'UTF8')::jsonb;
  EXCEPTION WHEN others THEN
    RETURN;
  END;
  IF jsonb_typeof(v) <> 'object' THEN RETURN; END IF;
  IF kind = 'board' AND array_length(parts, 1) = 3 AND parts[2] = 'finding' THEN
    INSERT INTO agent_findings AS f (session_id, agent_id, finding_type, content, confidence,
                                     created_at, bucket, key, revision, expires_at)
    VALUES (swarm_session(parts[1]), left(coalesce(v->>'agent', ''), 100),
            left(coalesce(v->>'category', 'observation'), 50), v,
            (CASE WHEN jsonb_typeof(v->'confidence') = 'number' THEN (v->>'confidence')::float END),
            coalesce(swarm_utc(v->>'timestamp'), now() AT TIME ZONE 'UTC'),
            p_bucket, p_key, p_revision, p_expires)
    ON CONFLICT (bucket, key) DO UPDATE SET
      agent_id = EXCLUDED.agent_id, finding_type = EXCLUDED.finding_type,
      content = EXCLUDED.content, confidence = EXCLUDED.confidence,
      revision = EXCLUDED.revision, expires_at = EXCLUDED.expires_at;
  ELSIF kind = 'board' AND array_length(parts, 1) = 2 AND parts[2] = 'context' THEN
    sid := swarm_session(parts[1]);  -- before the UPDATE: its snapshot misses a new row
    UPDATE agent_sessions SET context = coalesce(v->'data', v), revision = p_revision
      WHERE id = sid;
  ELSIF kind = 'board' AND array_length(parts, 1) = 2 AND parts[2] = 'session' THEN
    sid := swarm_session(parts[1]);
    UPDATE agent_sessions SET status = left(coalesce(v->>'status', 'active'), 50),
      created_at = coalesce(swarm_utc(v->>'started'), created_at)
      WHERE id = sid;
  ELSIF kind = 'tasks' AND array_length(parts, 1) = 2 THEN
    INSERT INTO agent_tasks AS t (session_id, assigned_to, task_type, parameters, status, result,
                                  created_at, completed_at, bucket, key, revision, expires_at)
    VALUES (swarm_session(parts[1]), left(v->>'assigned_to', 100),
            left(coalesce(v->>'type', ''), 50), v->'parameters',
            left(coalesce(v->>'status', 'pending'), 50),
            (CASE WHEN jsonb_typeof(v->'result') = 'null' THEN NULL ELSE v->'result' END),
            coalesce(swarm_utc(v->>'created_at'), now() AT TIME ZONE 'UTC'),
            swarm_utc(v->>'completed_at'), p_bucket, p_key, p_revision, p_expires)
    ON CONFLICT (bucket, key) DO UPDATE SET
      assigned_to = EXCLUDED.assigned_to, task_type = EXCLUDED.task_type,
      parameters = EXCLUDED.parameters, status = EXCLUDED.status, result = EXCLUDED.result,
      completed_at = EXCLUDED.completed_at, revision = EXCLUDED.revision,
      expires_at = EXCLUDED.expires_at;
  END IF;
END $$;

-- Remove a key (op 'del' or 'expire'): the row, its mirror, a change, a notification.
-- The caller holds the bucket's advisory lock.
CREATE OR REPLACE FUNCTION swarm_remove(p_bucket TEXT, p_key TEXT, p_op TEXT)
RETURNS BIGINT LANGUAGE plpgsql AS $$
DECLARE rev BIGINT;
BEGIN
  DELETE FROM swarm_state WHERE bucket = p_bucket AND key = p_key;
  rev := nextval('swarm_revision');
  INSERT INTO swarm_changes (revision, bucket, key, op) VALUES (rev, p_bucket, p_key, p_op);
  PERFORM swarm_project(p_bucket, p_key, NULL, rev, NULL);
  PERFORM pg_notify('swarm_changes', p_bucket || ' ' || rev);
  RETURN rev;
END $$;

-- create (p_mode 'create'), compare-and-set ('update', p_expected) or put ('put').
CREATE OR REPLACE FUNCTION swarm_write(
  p_bucket TEXT, p_key TEXT, p_value BYTEA, p_ttl_ms BIGINT, p_mode TEXT, p_expected BIGINT,
  OUT ok BOOLEAN, OUT rev BIGINT
) LANGUAGE plpgsql AS $$
DECLARE
  cur BIGINT;
  expiry TIMESTAMPTZ;
BEGIN
  PERFORM pg_advisory_xact_lock(hashtextextended(p_bucket, 0));
  SELECT s.revision, s.expires_at INTO cur, expiry FROM swarm_state s
    WHERE s.bucket = p_bucket AND s.key = p_key;
  IF cur IS NOT NULL AND expiry IS NOT NULL AND expiry <= clock_timestamp() THEN
    PERFORM swarm_remove(p_bucket, p_key, 'expire');
    cur := NULL;
  END IF;
  IF (p_mode = 'create' AND cur IS NOT NULL)
     OR (p_mode = 'update' AND cur IS DISTINCT FROM p_expected) THEN
    ok := false;
    rev := coalesce(cur, 0);
    RETURN;
  END IF;
  rev := nextval('swarm_revision');
  expiry := CASE WHEN p_ttl_ms > 0 THEN clock_timestamp() + p_ttl_ms * interval '1 millisecond' END;
  INSERT INTO swarm_state (bucket, key, value, revision, expires_at)
    VALUES (p_bucket, p_key, p_value, rev, expiry)
    ON CONFLICT (bucket, key) DO UPDATE SET value = EXCLUDED.value, revision = EXCLUDED.revision,
      expires_at = EXCLUDED.expires_at, updated_at = now();
  INSERT INTO swarm_changes (revision, bucket, key, op, value)
    VALUES (rev, p_bucket, p_key, 'put', p_value);
  PERFORM swarm_project(p_bucket, p_key, p_value, rev, expiry);
  PERFORM pg_notify('swarm_changes', p_bucket || ' ' || rev);
  ok := true;
END $$;

-- delete (only if still at p_expected when it is not NULL)
CREATE OR REPLACE FUNCTION swarm_delete(
  p_bucket TEXT, p_key TEXT, p_expected BIGINT, OUT ok BOOLEAN, OUT rev BIGINT
) LANGUAGE plpgsql AS $$
DECLARE
  cur BIGINT;
  expiry TIMESTAMPTZ;
BEGIN
  PERFORM pg_advisory_xact_lock(hashtextextended(p_bucket, 0));
  SELECT s.revision, s.expires_at INTO cur, expiry FROM swarm_state s
    WHERE s.bucket = p_bucket AND s.key = p_key;
  IF cur IS NOT NULL AND expiry IS NOT NULL AND expiry <= clock_timestamp() THEN
    PERFORM swarm_remove(p_bucket, p_key, 'expire');
    cur := NULL;
  END IF;
  IF p_expected IS NOT NULL AND cur IS DISTINCT FROM p_expected THEN
    ok := false;
    rev := coalesce(cur, 0);
  ELSIF cur IS NULL THEN
    ok := true;
    rev := 0;
  ELSE
    ok := true;
    rev := swarm_remove(p_bucket, p_key, 'del');
  END IF;
END $$;

-- Expire the bucket's keys whose TTL ran out (each emits its delete once) and drop
-- changes older than p_keep_seconds; the milliseconds until the next expiry (-1: none).
CREATE OR REPLACE FUNCTION swarm_sweep(p_bucket TEXT, p_limit INT, p_keep_seconds FLOAT)
RETURNS BIGINT LANGUAGE plpgsql AS $$
DECLARE
  k TEXT;
  nxt TIMESTAMPTZ;
BEGIN
  PERFORM pg_advisory_xact_lock(hashtextextended(p_bucket, 0));
  FOR k IN SELECT s.key FROM swarm_state s
           WHERE s.bucket = p_bucket AND s.expires_at <= clock_timestamp()
           ORDER BY s.expires_at LIMIT p_limit LOOP
    PERFORM swarm_remove(p_bucket, k, 'expire');
  END LOOP;
  DELETE FROM swarm_changes
    WHERE bucket = p_bucket AND at < now() - p_keep_seconds * interval '1 second';
  SELECT min(s.expires_at) INTO nxt FROM swarm_state s
    WHERE s.bucket = p_bucket AND s.expires_at IS NOT NULL;
  IF nxt IS NULL THEN RETURN -1; END IF;
  RETURN greatest(0, (extract(epoch FROM nxt - clock_timestamp()) * 1000)::BIGINT);
END $$;
