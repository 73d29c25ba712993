"""An error in one line: how status reports, the read model's figures and the drain's reasons show what failed."""


def one_line(exc: BaseException) -> str:
    """The first line of the error's message, or its type's name when it has none (a driver's errors run to several)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
