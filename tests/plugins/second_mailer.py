"""A second sender for the ``email`` kind: start-up must refuse it."""

from idemhook import sender


@sender("email")
def send_twice(message):
    return None
