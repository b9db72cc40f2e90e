"""ConfigError: a setting the gateway cannot use. In a room of its own so that the modules that
read a setting's syntax (tables.py) or check it against the database (resolver.py) can raise
it without importing config.py, which uses them to parse its settings."""


class ConfigError(ValueError):
    """A setting has a value the gateway cannot use; the message names it."""
