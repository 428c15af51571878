"""The one exception type for user errors: the CLI prints its message on one line and exits 2."""


class ScenarioError(Exception):
    """A user error in a scenario or a referenced file; the message names the key path and the value."""
