-- Who is sending an attempt right now: a copy of a job (a redelivery racing the
-- original) sends only after claiming its attempt here, so two copies send once. A
-- claim is a lease: a worker that died mid-send loses it when it expires.
CREATE TABLE delivery_claims (
    notification_id text        NOT NULL,
    replay          integer     NOT NULL,
    attempt         integer     NOT NULL,
    owner           text        NOT NULL,
    claimed_until   timestamptz NOT NULL,
    PRIMARY KEY (notification_id, replay, attempt)
);
