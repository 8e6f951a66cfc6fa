"""``python3 -m agent``: start the sandbox agent.

The agent speaks plain WebSocket and never TLS; ``hmac``/``hashlib`` would load OpenSSL's
libcrypto through ``_hashlib`` (about 2 MiB of every sandbox's memory) where the builtin
hashes do.  Blocking it here, before any import, leaves hashlib on its builtin fallbacks.
"""

import sys

sys.modules.setdefault("_hashlib", None)  # type: ignore[arg-type]
sys.modules.setdefault("ssl", None)  # type: ignore[arg-type]

from agent.main import main

sys.exit(main())
