"""The fan-out journal on disk (app/journal.py) and the ``journal`` commands, without instances.

docs/design.md, "Fan-out writes".
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from app.factory import create_app
from app.journal import CATCHING_UP, DIVERGED, Journal, JournalUnavailable
from app.loader import load

from .support import Spec, write_config

pytestmark = pytest.mark.unit

A, B = "127.0.0.1:9001", "127.0.0.1:9002"


def records(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))


def test_a_write_is_on_disk_before_it_is_sent_and_gone_once_nobody_owes_it(tmp_path):
    journal = Journal(tmp_path / "journal")
    with journal.lock(1):
        write = journal.begin("PUT", "/api/v1/suppliers/s/indicators", [("Content-Length", "4")], b"body", [A, B])
    assert records(journal.directory) == ["000000000001.body", "000000000001.json", "lock", "sequence"]
    assert (journal.directory / "000000000001.body").read_bytes() == b"body"
    assert json.loads((journal.directory / "000000000001.json").read_text())["owed"] == [A, B]
    assert (journal.withheld(A), journal.withheld(B)) == (CATCHING_UP, CATCHING_UP)
    with journal.lock(1):
        journal.settle(write, [A], 200)
    assert (journal.withheld(A), journal.withheld(B)) == (None, CATCHING_UP)
    assert [(w.seq, w.status, w.owed) for w in journal.owed(B)] == [(1, 200, [B])]
    with journal.lock(1):
        journal.settle(write, [B])
    assert records(journal.directory) == ["lock", "sequence"]
    assert journal.withheld(B) is None
    assert os.stat(journal.directory).st_mode & 0o777 == 0o700


def test_sequence_numbers_go_on_after_a_restart_and_order_is_kept(tmp_path):
    first = Journal(tmp_path / "journal")
    with first.lock(1):
        for i in range(3):
            first.settle(first.begin("PUT", f"/w/{i}", [], b"", [A, B]), [A], 200)
    again = Journal(tmp_path / "journal")  # a restarted balancer
    with again.lock(1):
        again.begin("PUT", "/w/3", [], b"", [A, B])
    assert [(w.seq, w.target) for w in again.owed(B)] == [(1, "/w/0"), (2, "/w/1"), (3, "/w/2"), (4, "/w/3")]
    assert [w.seq for w in again.owed(A)] == [4]


def test_the_lock_orders_writers_and_times_out(tmp_path):
    journal = Journal(tmp_path / "journal")
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with Journal(tmp_path / "journal").lock(1):
            holding.set()
            release.wait(5)

    other = threading.Thread(target=hold)
    other.start()
    holding.wait(5)
    with pytest.raises(JournalUnavailable) as refused:
        with journal.lock(0.2):
            pass
    assert str(refused.value) == f"another fan-out write or replay held the journal {journal.directory} for 0.2 s"
    release.set()
    other.join()
    with journal.lock(1):
        pass


def test_diverged_is_kept_until_cleared_and_temporaries_of_dead_writers_are_removed(tmp_path):
    journal = Journal(tmp_path / "journal")
    with journal.lock(1):
        write = journal.begin("POST", "/api/v1/suppliers", [], b"{}", [A, B])
        journal.settle(write, [A], 201)
        journal.mark_diverged(B, write, "409")
    assert journal.withheld(B) == DIVERGED
    assert journal.diverged()[B]["expected"] == 201
    stale = journal.directory / ".000000000002.json.999999999.0123abcd.tmp"  # no such process
    stale.write_text("{")
    with journal.lock(1):
        journal.begin("POST", "/api/v1/suppliers", [], b"{}", [A])
        assert journal.clear_diverged(B)
        assert not journal.clear_diverged(B)
    assert not stale.exists()
    assert journal.withheld(B) == CATCHING_UP


def test_a_damaged_record_is_left_for_the_operator(tmp_path, caplog):
    journal = Journal(tmp_path / "journal")
    with journal.lock(1):
        journal.begin("PUT", "/w", [], b"", [A])
    (journal.directory / "000000000001.json").write_text("{not json")
    assert journal.writes() == []
    assert "journal record" in caplog.text and "cannot be read" in caplog.text
    assert (journal.directory / "000000000001.json").read_text() == "{not json"


def test_journal_commands_name_an_instance_no_longer_configured(tmp_path):
    config = write_config(tmp_path, [Spec("127.0.0.1", 9001)], allowed=(("PUT", "/api/{v}/x"),))
    config.write_text(config.read_text().replace('<Request method="PUT">', '<Request method="PUT" fanout="true">'))
    loaded = load(config)
    journal = Journal(loaded.journal_dir)
    with journal.lock(1):
        journal.settle(journal.begin("PUT", "/api/v1/x", [], b"", [A, "127.0.0.1:9009"]), [A], 200)
    runner = create_app(loaded).test_cli_runner()
    listed = runner.invoke(args=["journal", "list"])
    assert listed.exit_code == 0, listed.output
    assert listed.stdout.splitlines() == [
        f"journal: {loaded.journal_dir}",
        f"{A}  up to date, owes 0 write(s)",
        "127.0.0.1:9009  not an enabled instance, owes 1 write(s); flask --app wsgi journal drop 127.0.0.1:9009 forgets them",
    ]
    dropped = runner.invoke(args=["journal", "drop", "127.0.0.1:9009", "--yes"])
    assert dropped.exit_code == 0, dropped.output
    assert dropped.stdout.splitlines()[-1] == "dropped 1 write(s) owed by 127.0.0.1:9009; it takes requests again"
    assert journal.writes() == []
    unknown = runner.invoke(args=["journal", "show", "127.0.0.1:9999"])
    assert unknown.exit_code == 3
