-- Every user belongs to a tenant (a project), and so do its devices and notifications.
-- An e-mail address is unique within a tenant: two projects may share a user.
ALTER TABLE users ADD COLUMN tenant text NOT NULL DEFAULT 'default';
DROP INDEX users_email_lower_key;
CREATE UNIQUE INDEX users_tenant_email_lower_key ON users (tenant, lower(email));
