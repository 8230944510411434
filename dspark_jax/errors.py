"""The two exception types of dspark_jax: library failures and bad user input."""


class DSparkError(Exception):
    """A failure the user can act on: CLIs print it as one `error: ...` line and exit 2."""


class UsageError(DSparkError, ValueError):
    """Bad input: one sentence naming the field, the bad value and what is accepted."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when the message is empty), for one-line errors that
    wrap a library's multi-line one."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
