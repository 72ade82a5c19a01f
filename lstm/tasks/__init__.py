"""Built-in tasks; importing this package registers them."""

from lstm.tasks import (
    char,  # noqa: F401
    ptb,  # noqa: F401
    rectangle,  # noqa: F401
)
