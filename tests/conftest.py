"""Fixtures shared by every test directory."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from picchat import logs


class Logged:
    """What picchat logged during a test (its own logger, not the standard
    library's, so pytest's caplog does not see it)."""

    def __init__(self, records: list[logs.Record]) -> None:
        self._all = records
        self._start = 0
        self._level = 0
        self._logger = ""

    @property
    def records(self) -> list[logs.Record]:
        return [
            r
            for r in self._all[self._start :]
            if r.levelno >= self._level and r.name.startswith(self._logger)
        ]

    @property
    def text(self) -> str:
        return "".join(f"{r.levelname} {r.name} {r.message}\n" for r in self.records)

    def clear(self) -> None:
        self._start = len(self._all)

    def set_level(self, level: int, logger: str = "") -> None:
        self._level, self._logger = level, logger

    @contextmanager
    def at_level(self, level: int, logger: str = "") -> Iterator[None]:
        saved = self._level, self._logger
        self.set_level(level, logger)
        try:
            yield
        finally:
            self._level, self._logger = saved


@pytest.fixture
def logged() -> Iterator[Logged]:
    with logs.capture(logs.DEBUG) as records:
        yield Logged(records)
