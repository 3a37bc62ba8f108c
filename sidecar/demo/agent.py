"""The sample agent: a plain HTTP client that knows nothing about tokens or policies.

It reads a JSON list of calls ``[{"method", "url", "headers", "body"}]`` from the file named on the
command line, makes them with ``urllib`` (which honours the standard ``HTTP_PROXY`` variable, as most
HTTP clients do), and prints one JSON line per call: ``{"status", "decision_id", "reason", "body"}``.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request


def main(argv: list[str]) -> int:
    """Run the calls in ``argv[0]``; always exits 0 (outcomes are judged by the caller)."""
    with open(argv[0], encoding="utf-8") as handle:
        calls = json.load(handle)
    opener = urllib.request.build_opener()  # ProxyHandler from the environment
    for call in calls:
        data = call.get("body")
        request = urllib.request.Request(  # noqa: S310 - the demo agent calls http:// URLs it is given
            call["url"],
            method=call["method"],
            headers=call.get("headers", {}),
            data=data.encode() if data is not None else None,
        )
        try:
            with opener.open(request, timeout=10) as response:
                status, headers, body = response.status, response.headers, response.read()
        except urllib.error.HTTPError as err:
            status, headers, body = err.code, err.headers, err.read()
        except OSError as err:
            status, headers, body = 0, {}, str(err).encode()
        print(
            json.dumps(
                {
                    "status": status,
                    "decision_id": headers.get("x-agent-authz-decision-id"),
                    "reason": headers.get("x-agent-authz-reason"),
                    "body": body.decode(errors="replace")[:500],
                }
            ),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
