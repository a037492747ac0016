-- Templates per tenant (project): every template, version and content belongs to the
-- tenant of the API key that created it, and two tenants may each have a template with
-- the same id. Every key (primary, unique, foreign) gains the tenant first, so a lookup
-- without it cannot match another tenant's row by accident.
--
-- Rows from before tenants belong to the default tenant (the operators', and every key's
-- before tenants existed). The column keeps no default afterwards: the store always names
-- the tenant. Adding a column with a constant default and swapping keys rewrite no row,
-- so the immutability triggers (BEFORE UPDATE) are not hit.

ALTER TABLE templates ADD COLUMN tenant text NOT NULL DEFAULT 'default';
ALTER TABLE template_versions ADD COLUMN tenant text NOT NULL DEFAULT 'default';
ALTER TABLE template_contents ADD COLUMN tenant text NOT NULL DEFAULT 'default';
ALTER TABLE templates ALTER COLUMN tenant DROP DEFAULT;
ALTER TABLE template_versions ALTER COLUMN tenant DROP DEFAULT;
ALTER TABLE template_contents ALTER COLUMN tenant DROP DEFAULT;

ALTER TABLE template_contents
    DROP CONSTRAINT template_contents_template_id_version_fkey,
    DROP CONSTRAINT template_contents_template_id_version_position_key,
    DROP CONSTRAINT template_contents_pkey;
ALTER TABLE template_versions
    DROP CONSTRAINT template_versions_template_id_fkey,
    DROP CONSTRAINT template_versions_pkey;
ALTER TABLE templates DROP CONSTRAINT templates_pkey;

ALTER TABLE templates ADD PRIMARY KEY (tenant, id);
ALTER TABLE template_versions
    ADD PRIMARY KEY (tenant, template_id, version),
    ADD FOREIGN KEY (tenant, template_id) REFERENCES templates (tenant, id) ON DELETE CASCADE;
ALTER TABLE template_contents
    ADD PRIMARY KEY (tenant, template_id, version, language),
    ADD UNIQUE (tenant, template_id, version, position),
    ADD FOREIGN KEY (tenant, template_id, version)
        REFERENCES template_versions (tenant, template_id, version) ON DELETE CASCADE;
