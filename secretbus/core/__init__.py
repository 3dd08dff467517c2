"""Model, errors, UUIDs, the secret XML codec and schema: nothing of secretbus below."""
