"""Entry point for uvicorn workers: each builds its app from the environment."""

from fastapi import FastAPI

from serving.app import create_app
from serving.settings import ServiceSettings


def app_factory() -> FastAPI:
    return create_app(ServiceSettings())
