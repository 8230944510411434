"""The two exception types of dspark_jax: library failures and bad user input."""


class DSparkError(Exception):
    """A failure the user can act on: CLIs print it as one `error: ...` line and exit 2."""


class UsageError(DSparkError, ValueError):
    """Bad input: one sentence naming the field, the bad value and what is accepted."""
