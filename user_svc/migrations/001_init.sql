-- Users, their push devices, and the status records of notifications sent to them.
-- Enum columns (platform, channel, status) hold the protobuf enum numbers.

CREATE TABLE users (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    email         text NOT NULL,
    display_name  text NOT NULL DEFAULT '',
    locale        text NOT NULL DEFAULT 'en',
    timezone      text NOT NULL DEFAULT 'UTC',
    email_opt_out boolean NOT NULL DEFAULT false,
    push_opt_out  boolean NOT NULL DEFAULT false,
    created_at    timestamptz NOT NULL DEFAULT now()
);

-- E-mail addresses are unique regardless of case: "Ann@x.org" and "ann@x.org" reach
-- the same mailbox in practice.
CREATE UNIQUE INDEX users_email_lower_key ON users (lower(email));

CREATE TABLE devices (
    id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id    uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    platform   smallint NOT NULL,
    -- A registration token names one physical device, so it belongs to one user.
    token      text NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX devices_user_id_idx ON devices (user_id);

CREATE TABLE notifications (
    id             uuid PRIMARY KEY,
    user_id        uuid NOT NULL REFERENCES users (id),
    template_id    text NOT NULL,
    correlation_id text NOT NULL DEFAULT '',
    created_at     timestamptz NOT NULL DEFAULT now()
);

-- Serves ListNotificationRecords: newest first with a (created_at, id) keyset, both
-- descending so that the row comparison in the query walks the index in order.
CREATE INDEX notifications_user_created_idx ON notifications (user_id, created_at DESC, id DESC);

CREATE TABLE deliveries (
    notification_id uuid NOT NULL REFERENCES notifications (id) ON DELETE CASCADE,
    channel         smallint NOT NULL,
    status          smallint NOT NULL,
    detail          text NOT NULL DEFAULT '',
    attempts        integer NOT NULL DEFAULT 0,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (notification_id, channel)
);
