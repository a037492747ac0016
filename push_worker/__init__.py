"""push_worker service."""
