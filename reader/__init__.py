"""bus-reader: history pages on a read-only connection."""
