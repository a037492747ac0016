-- One row per delivery attempt of a notification on this worker's channel (each worker keeps
-- it in its own database). The partial unique index is what makes redeliveries harmless:
-- a notification is DELIVERED at most once.
CREATE TABLE delivery_logs (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    notification_id text        NOT NULL,
    attempt         integer     NOT NULL CHECK (attempt >= 0),
    status          text        NOT NULL
        CHECK (status IN ('DELIVERED', 'RETRYING', 'FAILED', 'EXPIRED')),
    detail          text        NOT NULL DEFAULT '',
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE UNIQUE INDEX delivery_logs_delivered_once
    ON delivery_logs (notification_id) WHERE status = 'DELIVERED';

CREATE INDEX delivery_logs_by_notification ON delivery_logs (notification_id, created_at);
