"""A sender that cannot be called with a message: start-up must refuse it."""

from idemhook import sender


@sender("sms")
def send(message, extra):
    return None
