"""The single SQLite writer: the only process that writes the database."""
