"""The long-lived lvm shell: protocol, errors, timeouts, crashes and fallback,
against a fake ``lvm`` that speaks the shell's report-fd protocol."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from csi_lvm.lvm.commands import Lvm
from csi_lvm.lvm.errors import LvmAlreadyExists, LvmError, LvmTimeout
from csi_lvm.lvm.runner import Runner
from csi_lvm.lvm.shell import _Turns, shell_line

FAKE = """#!{python}
import json, os, shlex, sys, time

LV = {{"lv_name": "csi-a", "vg_name": "vg0", "lv_size": "1048576", "lv_attr": "Vwi-a-tz--",
       "pool_lv": "pool0", "lv_tags": "x", "lv_time": "1700000000"}}
mode = os.environ.get("FAKE_MODE", "")


def entry(kind, context, message, code):
    return {{"log_type": kind, "log_context": context, "log_object_type": "cmd",
             "log_message": message, "log_ret_code": str(code)}}


def answer(words):
    verb, name = words[0], words[words.index("--name") + 1] if "--name" in words else ""
    target = words[-1]
    if target.endswith("hang"):
        time.sleep(float(os.environ.get("FAKE_HANG_SECONDS", "60")))
    if target.endswith("crash"):
        os._exit(1)
    if name == "exists":
        return {{}}, 5, ['Logical volume "exists" already exists in volume group "vg0"']
    report = {{"report": [{{"lv": [LV]}}]}} if verb == "lvs" else {{"report": [{{"vg": []}}]}}
    return report, 1, []


if len(sys.argv) > 1:  # one process per command
    report, code, errors = answer(sys.argv[1:])
    print(json.dumps(report))
    print("\\n".join(errors), file=sys.stderr)
    sys.exit(0 if code == 1 else 5)

with open(os.environ["LVM_PID_FILE"], "a") as pids:
    pids.write(f"{{os.getpid()}}\\n")
out = os.fdopen(int(os.environ["LVM_REPORT_FD"]), "w")
last = []
for line in sys.stdin:
    words = shlex.split(line)
    if os.environ.get("FAKE_ORDER_FILE"):  # which commands ran, in their order
        with open(os.environ["FAKE_ORDER_FILE"], "a") as order:
            order.write(f"{{words[0]}} {{words[-1]}}\\n")
    if words == ["lastlog"]:
        document = {{"log": [entry("error", "processing", m, 0) for m in last]}}
    else:
        report, code, last = answer(words)
        document = dict(report)
        if mode != "no-log":
            status = "success" if code == 1 else "failure"
            document["log"] = [entry("status", "shell", status, code)]
    out.write("  " + json.dumps(document, indent=4) + "\\n")
    out.flush()
"""


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "lvm"
    path.write_text(FAKE.format(python=sys.executable))
    path.chmod(0o755)
    monkeypatch.setenv("LVM_PID_FILE", str(tmp_path / "pids"))
    return path


def shells(fake: Path) -> list[int]:
    pids = fake.parent / "pids"
    return [int(p) for p in pids.read_text().split()] if pids.exists() else []


def test_reports_and_changes_go_through_one_shell(fake: Path) -> None:
    lvm = Lvm(Runner(binary=str(fake), shell=True))
    try:
        lv = lvm.find_lv("vg0", "csi-a")
        assert lv is not None and lv.size_bytes == 1 << 20
        assert lv.created_at is not None  # seconds since the epoch, as the profile asks
        lvm.create_thin_volume("vg0", "pool0", "csi-b", 1 << 20, ["#odd:tag/=!&"])
        assert lvm.list_lvs(["vg0"])[0].name == "csi-a"
        assert len(shells(fake)) == 1
    finally:
        lvm.close()


def test_a_failure_is_classified_from_the_command_log(fake: Path) -> None:
    lvm = Lvm(Runner(binary=str(fake), shell=True))
    try:
        with pytest.raises(LvmAlreadyExists, match="already exists"):
            lvm.create_thin_volume("vg0", "pool0", "exists", 1 << 20, [])
        assert lvm.list_lvs(["vg0"])  # the shell carries on
        assert len(shells(fake)) == 1
    finally:
        lvm.close()


def test_a_command_past_its_timeout_stops_the_shell_and_the_next_gets_a_new_one(
    fake: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_HANG_SECONDS", "3")
    lvm = Lvm(Runner(binary=str(fake), shell=True))
    try:
        with pytest.raises(LvmTimeout):
            lvm.remove("vg0", "hang", timeout=1.0)
        assert lvm.list_lvs(["vg0"])
        assert len(shells(fake)) == 2
    finally:
        lvm.close()


def test_a_waiting_report_runs_before_waiting_changes(
    fake: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Sixteen creates queued for the shell must not keep the kept view's
    # refresh waiting behind all of them.
    order_file = fake.parent / "order"
    monkeypatch.setenv("FAKE_ORDER_FILE", str(order_file))
    monkeypatch.setenv("FAKE_HANG_SECONDS", "2")
    lvm = Lvm(Runner(binary=str(fake), shell=True))

    def ran() -> list[str]:
        return order_file.read_text().splitlines() if order_file.exists() else []

    try:
        lvm.list_vgs()
        running = threading.Thread(target=lvm.remove, args=("vg0", "hang"))
        running.start()
        while "lvremove vg0/hang" not in ran():
            time.sleep(0.05)
        changes = [threading.Thread(target=lvm.remove, args=("vg0", f"csi-{n}")) for n in range(3)]
        for change in changes:
            change.start()
        time.sleep(0.3)  # the changes wait for the shell
        report = threading.Thread(target=lvm.list_lvs, args=(["vg0"],))
        report.start()
        for thread in [running, *changes, report]:
            thread.join(30)
        after = ran()[ran().index("lvremove vg0/hang") + 1 :]
        assert after[0].startswith("lvs ") and sorted(after[1:]) == [
            f"lvremove vg0/csi-{n}" for n in range(3)
        ]
    finally:
        lvm.close()


def test_an_idle_shell_ends_and_the_next_command_starts_another(fake: Path) -> None:
    lvm = Lvm(Runner(binary=str(fake), shell=True, shell_idle_exit=0.2))
    try:
        lvm.list_vgs()
        (first,) = shells(fake)
        deadline = time.monotonic() + 10
        while process_exists(first) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not process_exists(first), "the idle shell did not end"
        assert lvm.list_lvs(["vg0"])
        assert len(shells(fake)) == 2 and process_exists(shells(fake)[1])
    finally:
        lvm.close()


def test_a_busy_shell_is_not_ended_for_idling(fake: Path) -> None:
    lvm = Lvm(Runner(binary=str(fake), shell=True, shell_idle_exit=1.0))
    try:
        for _ in range(8):  # 2 s of commands, never 1 s apart
            lvm.list_vgs()
            time.sleep(0.25)
        assert len(shells(fake)) == 1
    finally:
        lvm.close()


def process_exists(pid: int) -> bool:
    """Alive and not a zombie (a reaped-later child still has a /proc entry)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_dead_shell_is_replaced_and_a_report_asked_again(fake: Path) -> None:
    lvm = Lvm(Runner(binary=str(fake), shell=True))
    try:
        lvm.list_vgs()
        os.kill(shells(fake)[0], signal.SIGKILL)
        assert lvm.list_lvs(["vg0"])  # the dead shell is noticed and replaced
        assert len(shells(fake)) == 2
    finally:
        lvm.close()


def test_a_change_whose_shell_died_under_it_is_an_error_not_repeated(fake: Path) -> None:
    lvm = Lvm(Runner(binary=str(fake), shell=True))
    try:
        with pytest.raises(LvmError, match="died"):
            lvm.remove("vg0", "crash")
        assert lvm.list_lvs(["vg0"])
    finally:
        lvm.close()


def test_a_shell_without_command_log_falls_back_to_processes(
    fake: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_MODE", "no-log")
    lvm = Lvm(Runner(binary=str(fake), shell=True))
    try:
        assert lvm.list_lvs(["vg0"])[0].name == "csi-a"
        assert lvm.shell is not None and lvm.shell.disabled
        with pytest.raises(LvmAlreadyExists):
            lvm.create_thin_volume("vg0", "pool0", "exists", 1 << 20, [])
    finally:
        lvm.close()


def test_shell_lines_quote_every_word() -> None:
    assert shell_line(["lvs", "#tag", "a b"]) == '"lvs" "#tag" "a b"\n'
    assert shell_line(["lvs", 'say "x"']) == '"lvs" \'say "x"\'\n'
    assert shell_line(["lvs", "both\"'"]) is None
    assert shell_line(["lvs", "line\nbreak"]) is None
    assert shell_line(["lvs", ""]) is None
    assert shell_line(["lvs"] * 61) is None


def test_closing_waits_for_a_command_its_caller_gave_up_on(
    fake: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # In a container, whatever still runs when the driver exits is killed
    # with it: LVM must never be cut short that way.
    monkeypatch.setenv("FAKE_HANG_SECONDS", "3")
    lvm = Lvm(Runner(binary=str(fake), shell=True))
    with pytest.raises(LvmTimeout):
        lvm.remove("vg0", "hang", timeout=0.5)
    (abandoned,) = shells(fake)
    started = time.monotonic()
    lvm.close()
    assert time.monotonic() - started > 1.5  # it waited for the command
    with pytest.raises(ProcessLookupError):
        os.kill(abandoned, 0)


def test_waiting_changes_take_the_shell_in_the_order_they_came() -> None:
    # The fill of the scale bench starved one lvcreate past its timeout when
    # the command that had just run could take the shell again first.
    turns = _Turns()
    assert turns.take(report=False, timeout=1)
    order: list[int] = []

    def change(number: int) -> None:
        assert turns.take(report=False, timeout=10)
        order.append(number)
        turns.give_back()

    waiting = []
    for number in range(5):
        thread = threading.Thread(target=change, args=(number,))
        thread.start()
        waiting.append(thread)
        while len(turns._changes) <= number:  # queued before the next comes
            time.sleep(0.01)
    turns.give_back()
    # The one that gave the shell back asks again at once: it is last in line.
    assert turns.take(report=False, timeout=10)
    order.append(99)
    turns.give_back()
    for thread in waiting:
        thread.join(10)
    assert order == [0, 1, 2, 3, 4, 99]
    assert turns.take_if_free()  # nothing left waiting
    turns.give_back()
