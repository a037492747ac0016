"""notify_kit: the cross-cutting code every notify service shares.

Settings, TLS, server bootstrap (health, reflection, graceful shutdown), interceptors
(correlation id, access control, error mapping, logging), error mapping, AMQP topology
and publishing, PostgreSQL pools and migrations, telemetry. Nothing business-specific
lives here, and nothing happens at import time.
"""
