"""What the downloaders (fetch, Flickr) share: who they say they are, which failures are worth another
try, and how long to wait before it (the server's Retry-After when it sent one, else exponential backoff)."""

from __future__ import annotations

import email.utils
import time
import urllib.error

USER_AGENT = "spade-fetch/1.0 (+https://github.com/NVlabs/SPADE)"
# request timeout, throttled, and the server-side failures that pass
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
MAX_WAIT = 120.0  # seconds, whatever Retry-After asks


def retryable(exc: BaseException) -> bool:
    """A network failure or timeout, or an HTTP answer in RETRY_STATUS (another HTTP error is final)."""
    if isinstance(exc, urllib.error.HTTPError):  # before OSError: it is one
        return exc.code in RETRY_STATUS
    return isinstance(exc, OSError)  # URLError, connection resets, timeouts


def retry_delay(exc: BaseException, attempt: int, *, backoff: float) -> float:
    """Seconds to wait before attempt `attempt + 1`: the answer's Retry-After, else backoff * 2**attempt;
    at most MAX_WAIT."""
    delay = None
    if isinstance(exc, urllib.error.HTTPError) and exc.headers is not None:
        delay = retry_after(exc.headers.get("Retry-After"))
    return min(backoff * 2**attempt if delay is None else delay, MAX_WAIT)


def retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header: a number of seconds or an HTTP date (None if neither)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
