"""Built-in tasks. :func:`register_builtin` imports them, which registers them; importing this
package alone imports none, so that a task's config module (``ptb_config``) reads without torch."""


def register_builtin() -> None:
    from lstm.tasks import (
        char,  # noqa: F401
        ptb,  # noqa: F401
        rectangle,  # noqa: F401
    )
