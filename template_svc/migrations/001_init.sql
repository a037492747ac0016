-- Templates, their immutable versions, and one content per language per version.
--
-- templates.default_language is the current version's (what GetTemplate shows);
-- template_versions.default_language pins each version's own fallback, so rendering an
-- old version keeps working after a later version changes or drops that language.

CREATE TABLE templates (
    id               text PRIMARY KEY CHECK (id ~ '^[a-z][a-z0-9_-]{0,62}$'),
    description      text NOT NULL DEFAULT '',
    default_language text NOT NULL,
    current_version  integer NOT NULL CHECK (current_version >= 1),
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE template_versions (
    template_id      text NOT NULL REFERENCES templates (id) ON DELETE CASCADE,
    version          integer NOT NULL CHECK (version >= 1),
    default_language text NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (template_id, version)
);

-- NULL columns mean the channel (or the optional HTML body) is absent.
CREATE TABLE template_contents (
    template_id   text NOT NULL,
    version       integer NOT NULL,
    language      text NOT NULL,
    position      smallint NOT NULL,
    email_subject text,
    email_text    text,
    email_html    text,
    push_title    text,
    push_body     text,
    variables     text[] NOT NULL DEFAULT '{}',
    PRIMARY KEY (template_id, version, language),
    UNIQUE (template_id, version, position),
    FOREIGN KEY (template_id, version)
        REFERENCES template_versions (template_id, version) ON DELETE CASCADE,
    CHECK ((email_subject IS NULL) = (email_text IS NULL)),
    CHECK (email_html IS NULL OR email_subject IS NOT NULL),
    CHECK ((push_title IS NULL) = (push_body IS NULL)),
    CHECK (email_subject IS NOT NULL OR push_title IS NOT NULL)
);

-- Every replica caches versions and compiled templates forever; that is only correct
-- while a written version can never change, so the database refuses it.
CREATE FUNCTION template_version_immutable() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'template versions are immutable (% on %)', TG_OP, TG_TABLE_NAME;
END
$$;

CREATE TRIGGER template_versions_immutable
    BEFORE UPDATE ON template_versions
    FOR EACH ROW EXECUTE FUNCTION template_version_immutable();

CREATE TRIGGER template_contents_immutable
    BEFORE UPDATE ON template_contents
    FOR EACH ROW EXECUTE FUNCTION template_version_immutable();
