"""bus-cli: the command-line entry point."""
