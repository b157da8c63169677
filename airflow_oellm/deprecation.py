"""The provider's deprecation warnings: a name that still works, and goes in a coming release.

A module of its own at the package's root, so that the CLI can tell these apart without importing the
config package (the `evaluate` command runs in environments without the config's dependencies)."""


class ConfigDeprecationWarning(FutureWarning):
    """A config that still works but uses a name going away; shown by default, with file, line and key."""
