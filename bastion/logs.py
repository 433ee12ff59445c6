"""Log setup shared by `bastion serve` and its audit worker process: one format, one level, on stderr."""

from __future__ import annotations

import logging
import os
import sys


def configure_logging() -> None:
    """`BASTION_LOG_LEVEL` (default INFO); mitmproxy's and aiohttp's chatter only from WARNING up."""
    level = os.environ.get("BASTION_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=getattr(logging, level, logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("mitmproxy").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
