-- Jobs a worker gave up on, fed from failed.queue by the gateway's dead-letter consumer.
-- One row per job (kind + notification id, or a hash of a message that was not a job):
-- a redelivered copy or a later failure of a replayed job updates the row in place.
CREATE TABLE dead_letters (
    id              uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    job_key         text        NOT NULL UNIQUE,
    kind            text        NOT NULL,
    notification_id text        NOT NULL DEFAULT '',
    generation      integer     NOT NULL DEFAULT 0,  -- the job's replay generation
    reason          text        NOT NULL,
    attempts        integer     NOT NULL DEFAULT 0,
    correlation_id  text        NOT NULL DEFAULT '',
    body            bytea       NOT NULL,
    history         jsonb       NOT NULL DEFAULT '[]',
    state           smallint    NOT NULL DEFAULT 1,  -- DeadLetterState: 1 parked, 2 replayed
    replay_count    integer     NOT NULL DEFAULT 0,
    replayed_at     timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX dead_letters_newest ON dead_letters (created_at DESC, id DESC);
