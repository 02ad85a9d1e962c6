"""The test kit for handler authors (docs/plugins.md, "The test kit").

``Kit`` is a receiver under test with row assertions (the ``idemhook`` fixture
returns one); ``deliver``/``signed`` sign a request for any Flask test client;
``ANY`` stands for any value in the ``assert_*`` helpers. The fixtures come
from :mod:`idemhook.testing.pytest_plugin`, enabled when idemhook is installed.
Importing this module does not need pytest.
"""

from idemhook.testing import ANY as ANY
from idemhook.testing import Kit as Kit
from idemhook.testing import deliver as deliver
from idemhook.testing import signed as signed
