"""One timed GET for the open-loop load clients of the serving and soak benchmarks."""

import time

import httpx


async def timed_get(
    client: httpx.AsyncClient, path: str, params: dict[str, int]
) -> tuple[int, float]:
    """(status, milliseconds); status 0 when the request failed at the transport level.

    A pooled keep-alive connection that the server closed as it went idle fails the next
    request on it with a read error before anything was sent to the application: such a
    request is retried once on a fresh connection (as browsers and HTTP clients do for
    idempotent requests); a second failure counts."""
    started = time.perf_counter()
    for attempt in range(2):
        try:
            response = await client.get(path, params=params)
            return response.status_code, (time.perf_counter() - started) * 1000
        except (httpx.ReadError, httpx.RemoteProtocolError):
            if attempt == 1:
                break
        except httpx.HTTPError:
            break
    return 0, (time.perf_counter() - started) * 1000
