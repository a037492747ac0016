"""user_svc: the UserService (users, preferences, devices, notification status records)."""
