"""The error types a user acts on (the entry points print their message as one line; any other exception is a bug
and prints with a hint of --verbose). Imported from everywhere, so it imports nothing of the package."""


class ConfigError(ValueError):
  """A config value (or command-line flag) that cannot work; the message names the key."""
