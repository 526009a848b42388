"""The only package that talks to Ray: scoring (Ray Data), training (Ray Train), the CLI."""
