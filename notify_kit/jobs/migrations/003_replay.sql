-- The replay generation of an attempt: attempts count afresh after an operator replays a
-- dead letter, and the outcome of attempt N of one generation is not that of another.
ALTER TABLE delivery_logs ADD COLUMN replay integer NOT NULL DEFAULT 0 CHECK (replay >= 0);
