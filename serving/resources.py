"""What a worker holds while it runs, typed, on `app.state.resources`: made by the app's
lifespan, released when it ends."""

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from serving.answers import Answers
from serving.cache import Cache
from serving.live import LiveVersion
from serving.settings import ServiceSettings


@dataclass
class Resources:
    settings: ServiceSettings
    live: LiveVersion
    cache: Cache
    search_threads: ThreadPoolExecutor
    answers: Answers

    def close(self) -> None:
        self.search_threads.shutdown(wait=True)
