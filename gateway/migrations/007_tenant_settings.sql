-- What a tenant sets for itself: its recipient limits, per channel kind
-- ({"push": {"limit": 10, "seconds": 3600}}; limit 0: none on that channel). A tenant
-- without a row has the gateway's defaults. Read with the key that authenticates a
-- call (one query, cached with the key), so a send costs no lookup of its own.
CREATE TABLE tenant_settings (
    tenant           text PRIMARY KEY,
    recipient_limits jsonb NOT NULL DEFAULT '{}',
    updated_at       timestamptz NOT NULL DEFAULT now()
);
