-- API keys of external clients. Only a SHA-256 of the key is stored: keys are 32 random
-- bytes, so a fast hash is enough and lookups stay a primary-key read.
CREATE TABLE api_keys (
    id          uuid PRIMARY KEY,
    name        text NOT NULL,
    key_hash    bytea NOT NULL UNIQUE,
    scopes      text[] NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
