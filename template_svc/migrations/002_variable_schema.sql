-- Declared variables per version (a JSON array of {name, type, required}; empty: none
-- declared) and, per content, the variables its one-line fields read, so the gateway can
-- refuse at accept a send that could only fail at the worker.
-- Adding a column rewrites no row, so the immutability triggers (BEFORE UPDATE) are not hit.
ALTER TABLE template_versions ADD COLUMN variables jsonb NOT NULL DEFAULT '[]';
ALTER TABLE template_contents ADD COLUMN line_variables text[] NOT NULL DEFAULT '{}';
