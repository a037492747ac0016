-- Which provider delivered (or last failed) an attempt, so failover is visible per row.
ALTER TABLE delivery_logs ADD COLUMN provider text NOT NULL DEFAULT '';
