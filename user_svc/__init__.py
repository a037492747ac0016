"""user_svc service."""
