-- The replay generation of a delivery's latest report (an operator's replay of a dead
-- letter starts a new one); see UPDATE_DELIVERY in store.py.
ALTER TABLE deliveries ADD COLUMN replay integer NOT NULL DEFAULT 0 CHECK (replay >= 0);
