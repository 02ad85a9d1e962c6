"""Exit 1 naming the first of the given TCP ports (on 127.0.0.1) that is taken; 0 if all are free.

Arguments: pairs of a setting's name and its port (``PORT 8000 EMAIL_SMTP_PORT 8025``).
`make run` runs it before anything is installed or printed, with the system's Python
(it needs only the standard library), and scripts/demo.sh again when run by itself.
"""

import socket
import sys

EXAMPLES = {"PORT": "8001", "EMAIL_SMTP_PORT": "8026"}

for name, value in zip(sys.argv[1::2], sys.argv[2::2], strict=True):
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn binds
        try:
            s.bind(("127.0.0.1", int(value)))
        except (OSError, ValueError):
            print(
                f"Port {value} is in use (or is not a port number): stop what listens on it, "
                f"or choose another port with {name}=, e.g. {name}={EXAMPLES.get(name, '8001')} "
                "make run",
                file=sys.stderr,
            )
            sys.exit(1)
