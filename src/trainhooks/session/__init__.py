"""Sessions: the raw session, the hook protocol, monitored sessions and their creators."""
