-- Every key acts for one tenant (a project); keys made before tenants existed act for
-- the default one, the operators'.
ALTER TABLE api_keys ADD COLUMN tenant text NOT NULL DEFAULT 'default';
CREATE INDEX api_keys_tenant_newest ON api_keys (tenant, created_at DESC, id DESC);
