"""email_worker service."""
