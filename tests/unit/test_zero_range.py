"""The zero-range filter: its program, and what it does to real files.

The behaviour tests run fallocate(1) on files in a temporary directory, on the
host's own kernel: seccomp needs no device-mapper.
"""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import pytest

from csi_lvm.zero_range import (
    FALLOC_FL_ZERO_RANGE,
    call_with_zero_range_skipped,
    filter_instructions,
    filter_program,
)

PAGE = 4096


ARCHES = {"x86_64": (0xC000003E, 285), "aarch64": (0xC00000B7, 47)}
ALLOW, SKIP = 0x7FFF0000, 0x00050000  # SKIP: RET_ERRNO with errno 0, i.e. success


def evaluate(instructions: list[tuple[int, int, int, int]], arch: int, nr: int, mode: int) -> int:
    """Run the filter on one struct seccomp_data, as the kernel would."""
    fields = {0: nr, 4: arch, 24: mode}
    accumulator, index = 0, 0
    while True:
        code, if_true, if_false, operand = instructions[index]
        if code == 0x20:  # load a 32-bit word of seccomp_data
            accumulator = fields[operand]
            index += 1
        elif code in (0x15, 0x45):  # jump if equal / if any bit set
            hit = accumulator == operand if code == 0x15 else bool(accumulator & operand)
            index += 1 + (if_true if hit else if_false)
        else:
            assert code == 0x06
            return operand


@pytest.mark.parametrize("machine", sorted(ARCHES))
def test_the_filter_skips_only_zero_range_fallocates(machine: str) -> None:
    instructions = filter_instructions(machine)
    assert instructions is not None
    arch, fallocate_nr = ARCHES[machine]
    keep_size = 0x01
    assert evaluate(instructions, arch, fallocate_nr, FALLOC_FL_ZERO_RANGE) == SKIP
    assert evaluate(instructions, arch, fallocate_nr, FALLOC_FL_ZERO_RANGE | keep_size) == SKIP
    assert evaluate(instructions, arch, fallocate_nr, 0) == ALLOW  # allocate
    assert evaluate(instructions, arch, fallocate_nr, 0x02 | keep_size) == ALLOW  # punch hole
    assert evaluate(instructions, arch, fallocate_nr + 1, FALLOC_FL_ZERO_RANGE) == ALLOW
    assert evaluate(instructions, 0x40000003, fallocate_nr, FALLOC_FL_ZERO_RANGE) == ALLOW  # i386
    program = filter_program(machine)
    assert program is not None and len(program) == 8 * len(instructions)


def test_an_unknown_machine_gets_no_filter() -> None:
    assert filter_instructions("mips") is None
    assert filter_program("mips") is None


def _file_of_ones(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.write_bytes(b"\xff" * (2 * PAGE))
    return path


def _fallocate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["fallocate", *args], capture_output=True, text=True, check=False)


def test_zero_range_is_answered_without_io_on_the_filtered_thread(tmp_path: Path) -> None:
    path = _file_of_ones(tmp_path, "filtered")
    done, filtered = call_with_zero_range_skipped(
        lambda: _fallocate("--zero-range", "--offset", "0", "--length", str(PAGE), str(path))
    )
    assert filtered
    assert done.returncode == 0, done.stderr
    assert path.read_bytes() == b"\xff" * (2 * PAGE)  # reported done, nothing written


def test_other_fallocate_modes_still_run_on_the_filtered_thread(tmp_path: Path) -> None:
    path = _file_of_ones(tmp_path, "punched")
    done, filtered = call_with_zero_range_skipped(
        lambda: _fallocate("--punch-hole", "--offset", "0", "--length", str(PAGE), str(path))
    )
    assert filtered and done.returncode == 0, done.stderr
    assert path.read_bytes() == bytes(PAGE) + b"\xff" * PAGE


def test_the_filter_stays_on_its_own_threads(tmp_path: Path) -> None:
    call_with_zero_range_skipped(lambda: None)  # the executor's threads exist
    path = _file_of_ones(tmp_path, "unfiltered")
    done = _fallocate("--zero-range", "--offset", "0", "--length", str(PAGE), str(path))
    assert done.returncode == 0, done.stderr
    assert path.read_bytes() == bytes(PAGE) + b"\xff" * PAGE
    seen: list[str] = []

    def status() -> None:
        seen.append(Path("/proc/thread-self/status").read_text())

    other = threading.Thread(target=status)
    other.start()
    other.join()
    for text in (Path("/proc/thread-self/status").read_text(), seen[0]):
        assert "Seccomp:\t0" in text
    filtered_status, _ = call_with_zero_range_skipped(
        lambda: Path("/proc/thread-self/status").read_text()
    )
    assert "Seccomp:\t2" in filtered_status
