"""Permissions, polkit details and the polkit client, caller identity."""
