-- The admin service's keys: an optional expiry, when a key last authenticated a call,
-- and, after a rotation, the previous secret with the end of its grace period.
ALTER TABLE api_keys
    ADD COLUMN expires_at timestamptz,
    ADD COLUMN last_used_at timestamptz,
    ADD COLUMN previous_hash bytea UNIQUE,
    ADD COLUMN previous_expires_at timestamptz;
CREATE INDEX api_keys_newest ON api_keys (created_at DESC, id DESC);
