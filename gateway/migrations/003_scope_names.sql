-- API-key scopes are now declared in the contracts (proto/notify/v1/access.proto) with
-- names per resource. Keys keep what they could do: "send" sends, "read" reads
-- notifications, users and templates, "admin" stays admin (which grants every scope).
UPDATE api_keys SET scopes = ARRAY(
    SELECT DISTINCT renamed
    FROM unnest(scopes) AS old,
         unnest(CASE old
             WHEN 'send' THEN ARRAY['notifications:send']
             WHEN 'read' THEN ARRAY['notifications:read', 'users:read', 'templates:read']
             ELSE ARRAY[old]
         END) AS renamed
    ORDER BY renamed
);
