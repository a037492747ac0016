-- A key's own rate limit (a token bucket); NULL: the gateway's default for keys.
ALTER TABLE api_keys
    ADD COLUMN rate_per_second double precision,
    ADD COLUMN rate_burst integer;
