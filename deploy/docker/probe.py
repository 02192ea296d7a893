"""Container health probe: GET http://127.0.0.1:$SLUICE_PORT/<path>; exit 0 on 200, else 1.

The images carry no curl or wget; the Dockerfile's HEALTHCHECK runs this on `/healthz` and
docker compose on `/readyz`. Standard library only, so it starts in a few milliseconds.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

TIMEOUT_S = 2.0


def probe(path: str, port: str) -> bool:
    """True if the server on this container's loopback answers `path` with 200."""
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):  # HTTPError (a 503) is a URLError
        return False


def main(argv: list[str]) -> int:
    path = argv[1] if len(argv) > 1 else "/healthz"
    return 0 if probe(path, os.environ.get("SLUICE_PORT", "8000")) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
