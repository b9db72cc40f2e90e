"""Tooling for development, not the product: a throwaway PostgreSQL and `gateway demo`."""
