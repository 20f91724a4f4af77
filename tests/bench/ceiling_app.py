"""A bare FastAPI endpoint returning a constant: the framework's ceiling on this machine,
measured in the same run as the real service."""

from fastapi import FastAPI

app = FastAPI()
_ANSWER: dict[str, object] = {
    "model_version": "constant",
    "items": [{"item_id": i, "score": 1.0} for i in range(10)],
}


@app.get("/v1/users/{user_id}/recommendations")
async def constant(user_id: str, k: int = 10) -> dict[str, object]:
    """On the event loop, as the service's GET routes run: no thread-pool hop."""
    return _ANSWER
