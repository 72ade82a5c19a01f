"""Built-in tasks; importing this package registers them."""

from lstm.tasks import rectangle  # noqa: F401
