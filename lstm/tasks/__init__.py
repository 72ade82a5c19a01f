"""Built-in tasks; importing this package registers them."""

from lstm.tasks import rectangle  # noqa: F401
from lstm.tasks import char  # noqa: F401
from lstm.tasks import ptb  # noqa: F401
