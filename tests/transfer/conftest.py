"""One real redis-server for the whole test session; each test gets its own key prefix."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
import redis

from services.transfer.local_redis import LocalRedis

_ids = itertools.count()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with LocalRedis() as server:
        yield server.url


@pytest.fixture
def client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url, decode_responses=True)


@pytest.fixture
def prefix() -> str:
    return f"test{next(_ids)}:"
