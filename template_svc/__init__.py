"""template_svc service."""
