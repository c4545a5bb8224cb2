"""Nothing on the served hook path blocks a gevent worker's loop, even with the audit database locked.

A dedicated ``medgemma-cds serve`` (gevent workers, SQLite store) with gevent's monitor thread on: it reports
any greenlet that keeps the loop for two seconds (a CPU-bound hook takes milliseconds, even on a busy
machine). Sixteen connections send new charts; meanwhile the test holds SQLite's write lock for a few
seconds, so every audit batch waits on it. Hooks must go on being answered while it is held (the wait runs
on a real thread) and no report may appear once the workers serve. No timing assert: counts of answers and
the monitor's reports only.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support import Issuer
from support import RedisServer
from support import served_on_sqlite
from test_served_under_load import SUMMARY
from test_served_under_load import new_chart

CONNECTIONS = 16
LOCK_HELD_S = 4.0
BLOCKED_REPORT = "appears to be blocked"


@pytest.fixture(scope="module")
def served(
    issuer: Issuer, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path, Path]]:
    """Serve with the default options and gevent's monitor thread; yield the URL, the SQLite file, the log."""
    with served_on_sqlite(
        issuer,
        redis_server.new_database(),
        tmp_path_factory.mktemp("served-hub"),
        MEDGEMMA_CDS_AUTH_DISABLED="true",
        GEVENT_MONITOR_THREAD_ENABLE="true",
        GEVENT_MAX_BLOCKING_TIME="2.0",
    ) as served:
        yield served


def test_16_connections_of_new_charts_never_block_the_loop_even_with_the_audit_database_locked(
    served: tuple[str, Path, Path],
) -> None:
    url, database, log_path = served
    bodies = [new_chart(n) for n in range(8)]
    answered: list[float] = []  # when each answer arrived
    failures: list[str] = []
    stop = threading.Event()

    def connection(number: int) -> None:
        with httpx.Client(timeout=30) as client:
            sent = 0
            while not stop.is_set():
                body = bodies[(number + sent) % len(bodies)]
                body = body | {"context": body["context"] | {"patientId": f"hub-{number}-{sent}"}}
                response = client.post(url + SUMMARY, json=body)
                sent += 1
                if response.status_code != 200 or not response.json().get("cards"):
                    failures.append(f"{response.status_code} {response.text[:200]}")
                answered.append(time.monotonic())

    threads = [threading.Thread(target=connection, args=(n,)) for n in range(CONNECTIONS)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(2.0)
        # Hold SQLite's write lock: every audit batch now waits for it (the store's busy timeout is 30 s).
        locker = sqlite3.connect(database, timeout=30, isolation_level=None)
        locker.execute("BEGIN IMMEDIATE")
        locked_at = time.monotonic()
        time.sleep(LOCK_HELD_S)
        unlocked_at = time.monotonic()
        locker.execute("ROLLBACK")
        locker.close()
        time.sleep(1.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)

    assert not failures, failures[:3]
    # Audit batches flush within a quarter of a second: from then on each worker's writer waits on the lock.
    while_locked = [at for at in answered if locked_at + 1.0 <= at <= unlocked_at]
    assert len(while_locked) >= CONNECTIONS, (
        f"{len(while_locked)} answers while the audit database was locked"
    )
    # Every call was audited once the lock was gone: the rows waited, none was lost.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with sqlite3.connect(database) as connection_:
            rows = connection_.execute("SELECT COUNT(*) FROM hook_audit").fetchone()[0]
        if rows >= len(answered):
            break
        time.sleep(0.2)
    assert rows >= len(answered)
    # A worker loading the app (before it serves), or a module imported on its first use (once per process),
    # may take the loop for a while; nothing else may.
    reports = log_path.read_text().split("=" * 80)[1:]
    stacks = [report.split("Info:")[0] for report in reports if BLOCKED_REPORT in report]
    serving = [stack for stack in stacks if "load_wsgi" not in stack and "_find_and_load" not in stack]
    assert not serving, serving[0][-3000:]
