-- The outbox: each queued delivery keeps its job, so the gateway's reconciler can
-- publish it again when it never reached a worker, and knows when it expires.
ALTER TABLE deliveries
    ADD COLUMN job bytea,
    ADD COLUMN expire_at timestamptz,
    ADD COLUMN reconciled integer NOT NULL DEFAULT 0;

-- What the reconciler scans: deliveries still in flight, oldest first.
CREATE INDEX deliveries_in_flight ON deliveries (updated_at)
    WHERE status IN (1, 2, 3, 5);  -- ACCEPTED, QUEUED, SENDING, RETRYING
