"""Whether the Hugging Face Hub can be reached, asked once and quickly, before a Hub client is.

The Hub's clients retry an unreachable endpoint for tens of seconds, printing a warning at each
try, before they fail. On an offline node (most cluster compute nodes) that is noise before our
own one-line error. ``offline_unless_reachable`` opens one TCP connection to the endpoint with a
short timeout; when that fails it switches the clients to offline mode (``HF_HUB_OFFLINE``), so
they read their local cache at once and fail at once when it does not hold the data.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

TIMEOUT_S = 3.0
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
CLIENT_FLAGS = (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE"),
                ("datasets.config", "HF_DATASETS_OFFLINE"))
"""The offline flags clients read from the environment at their import: (module, attribute)."""


def endpoint() -> str:
    """The Hub endpoint the clients use (``HF_ENDPOINT``, else huggingface_hub's default)."""
    from huggingface_hub import constants  # light: no network, no torch

    return constants.ENDPOINT


def reachable(url: str | None = None, timeout_s: float = TIMEOUT_S) -> bool:
    """Whether a TCP connection to the endpoint's host opens within ``timeout_s``."""
    u = urlparse(url or endpoint())
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        with socket.create_connection((u.hostname or "", port), timeout=timeout_s):
            return True
    except OSError:  # no route, no DNS, refused, timed out
        return False


def offline_requested() -> bool:
    """The environment asks the clients to run offline."""
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in OFFLINE_VARS)


def offline_unless_reachable() -> bool:
    """True when the clients are (now) in offline mode: asked for by the environment, or set
    here because the endpoint did not answer. Call before importing ``datasets``."""
    if offline_requested():
        return True
    if reachable():
        return False
    for v in OFFLINE_VARS:
        os.environ[v] = "1"
    # Clients imported already read the environment at their import: tell them too.
    import sys

    for mod, attr in CLIENT_FLAGS:
        if mod in sys.modules and hasattr(sys.modules[mod], attr):
            setattr(sys.modules[mod], attr, True)
    return True
