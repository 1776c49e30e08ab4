"""The only code that runs cryptsetup: LUKS2 headers, dm-crypt mappings, keys.

The key design (README, "Encryption"): every encrypted volume has a volume
key of its own, random, made by ``luksFormat`` and kept only in the LUKS2
header's keyslots, wrapped by a key-encryption key (KEK) that the node-stage
Secret holds. Opening unwraps it; ``luksErase`` destroys every keyslot, so
the data is gone without a block being zeroed.

A key reaches cryptsetup through a pipe (stdin, or ``/dev/fd/N`` for a
second one), never a file, an argument or the environment; it is never
logged or put in a message. The KEK is a random key of at least 32 bytes,
not a password, so the keyslots use PBKDF2 at its floor: stretching a
random key adds nothing, and argon2's gigabyte per open would starve a node
opening many volumes. Mappings are opened with ``--disable-keyring``: the
volume key stays in the dm table (readable by root only), so a resize needs
no key and no keyring access in the container.

Nothing here knows about LVM or CSI ids: callers hand in device nodes and
mapping names.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from csi_lvm import fs
from csi_lvm.errors import (
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    PermissionDenied,
)

LUKS2 = "luks2"
# The node-stage Secret's keys: the KEK, and while it is rotated, the one before.
KEY_FIELD = "key"
PREVIOUS_KEY_FIELD = "previousKey"
MINIMUM_KEY_BYTES = 32
# Two keyslots (one more while a KEK is rotated) in a 1 MiB header: the
# filesystem gets all of the LV but that.
HEADER_BYTES = 1 << 20
_FORMAT_OPTIONS = (
    "--type", "luks2", "--cipher", "aes-xts-plain64", "--key-size", "512",
    "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000",
    "--luks2-metadata-size", "16k", "--luks2-keyslots-size", "512k",
    "--label", "csi-lvm",
)  # fmt: skip
_SLOT_OPTIONS = ("--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000")
_MAPPING_PREFIX = "csi-lvm-"
_MAX_DM_NAME = 127
_ENV = {**os.environ, "LC_ALL": "C"}
# cryptsetup's exit codes (cryptsetup(8), RETURN CODES).
_WRONG_KEY = 2
_NOT_ACTIVE = 4
_BUSY = 5
_TIMEOUT = 120.0


class CryptError(Internal):
    pass


class WrongKey(PermissionDenied):
    pass


@dataclass(frozen=True)
class Keys:
    """The KEK a volume is opened with, and the previous one while it is
    rotated. ``repr`` never shows them."""

    key: bytes = field(repr=False)
    previous: bytes | None = field(default=None, repr=False)


def keys_from(secrets: Mapping[str, str], what: str) -> Keys:
    """The keys of a request's node-stage secrets: INVALID_ARGUMENT, naming
    the field and never a value, when the KEK is missing or too short."""
    key = secrets.get(KEY_FIELD, "")
    if not key:
        given = ", ".join(sorted(secrets)) or "none"
        raise InvalidArgument(
            f"{what} is encrypted and the call carries no '{KEY_FIELD}' secret (fields given: "
            f"{given}): name a Secret holding it in the StorageClass parameters "
            "csi.storage.k8s.io/node-stage-secret-name and -namespace"
        )
    keys = Keys(key.encode(), secrets.get(PREVIOUS_KEY_FIELD, "").encode() or None)
    for name, value in ((KEY_FIELD, keys.key), (PREVIOUS_KEY_FIELD, keys.previous)):
        if value is not None and len(value) < MINIMUM_KEY_BYTES:
            raise InvalidArgument(
                f"the node-stage secret's '{name}' has {len(value)} bytes; a key-encryption "
                f"key must be a random key of at least {MINIMUM_KEY_BYTES} bytes (for "
                "instance: openssl rand -base64 48)"
            )
    return keys


def mapping_name(device_class: str, lv_name: str) -> str:
    """The dm-crypt mapping of an LV: found again from the volume id alone
    (teardown runs after the LV may be gone)."""
    name = f"{_MAPPING_PREFIX}{device_class}-{lv_name}"
    if len(name) <= _MAX_DM_NAME:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:32]
    return f"{_MAPPING_PREFIX}{device_class[:40]}-{digest}"


def mapping_path(name: str) -> str:
    return f"/dev/mapper/{name}"


def is_open(name: str) -> bool:
    return os.path.exists(mapping_path(name))


def _run(
    command: Sequence[str], key: bytes | None = None, second_key: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run cryptsetup with ``key`` on its stdin and ``second_key`` readable
    at the path that replaces ``{fd}`` in the command."""
    fds: tuple[int, ...] = ()
    args = list(command)
    reader = writer = -1
    if second_key is not None:
        reader, writer = os.pipe()
        os.write(writer, second_key)  # a key fits in a pipe's buffer
        os.close(writer)
        fds = (reader,)
        args = [a.replace("{fd}", f"/dev/fd/{reader}") for a in args]
    try:
        return subprocess.run(
            ["cryptsetup", *args],
            input=key if key is not None else b"",
            capture_output=True,
            env=_ENV,
            timeout=_TIMEOUT,
            check=False,
            pass_fds=fds,
        )
    except subprocess.TimeoutExpired as exc:
        raise DeadlineExceeded(f"cryptsetup {args[0]} did not finish in {_TIMEOUT:.0f} s") from exc
    except FileNotFoundError as exc:
        raise FailedPrecondition(
            "cryptsetup is not installed on this node: encrypted volumes need it "
            "(Debian: cryptsetup-bin)"
        ) from exc
    finally:
        if reader >= 0:
            os.close(reader)


def _said(done: subprocess.CompletedProcess[bytes]) -> str:
    text = (done.stderr or done.stdout).decode(errors="replace")
    return " ".join(text.split()) or f"exit code {done.returncode}"


def _checked(done: subprocess.CompletedProcess[bytes], doing: str) -> None:
    if done.returncode != 0:
        raise CryptError(f"{doing} failed: {_said(done)}")


def is_luks(device: str) -> bool:
    return _run(["isLuks", "--type", LUKS2, device]).returncode == 0


def format_device(device: str, key: bytes) -> None:
    """A new LUKS2 header on ``device`` with a random volume key, wrapped by ``key``."""
    _checked(
        _run(["luksFormat", "--batch-mode", *_FORMAT_OPTIONS, "--key-file", "-", device], key),
        f"formatting {device} with LUKS2",
    )


def open_mapping(device: str, name: str, key: bytes) -> str:
    """Open ``device`` as mapping ``name``: its path. WrongKey when ``key``
    opens no keyslot."""
    done = _run(
        ["open", "--type", LUKS2, "--disable-keyring", "--key-file", "-", device, name], key
    )
    if done.returncode == _WRONG_KEY:
        raise WrongKey(f"the key opens no keyslot of {device}")
    _checked(done, f"opening {device}")
    return mapping_path(name)


def close_mapping(name: str) -> None:
    """Close a mapping (nothing to do when it is not open)."""
    done = _run(["close", name])
    if done.returncode == _NOT_ACTIVE:
        return
    if done.returncode == _BUSY:
        raise FailedPrecondition(
            f"the encrypted mapping {name} is still in use (a published block volume, or a "
            "mount elsewhere); unpublish the volume first"
        )
    _checked(done, f"closing {name}")


def backing_device(name: str) -> str | None:
    """The major:minor of the device under an open mapping (None: not open)."""
    try:
        dm = os.path.basename(os.path.realpath(mapping_path(name)))
        slaves = os.listdir(f"/sys/block/{dm}/slaves")
        if len(slaves) != 1:
            return None
        with open(f"/sys/block/{slaves[0]}/dev") as dev:
            return dev.read().strip()
    except OSError:
        return None


def resize(name: str) -> None:
    """Grow the open mapping to the end of its grown device (no key needed:
    it is in the dm table)."""
    _checked(_run(["resize", name]), f"growing the encrypted mapping {name}")


def rewrap(device: str, old: bytes, new: bytes) -> None:
    """Wrap the volume key with ``new`` as well as ``old``, then drop ``old``:
    a crash between the two leaves both working, never neither."""
    _checked(
        _run(
            ["luksAddKey", "--batch-mode", *_SLOT_OPTIONS, "--key-file", "-",
             "--new-keyfile", "{fd}", device],
            old,
            new,
        ),
        f"adding the new key-encryption key to {device}",
    )  # fmt: skip
    drop_key(device, old)


def drop_key(device: str, key: bytes) -> bool:
    """Remove the keyslot ``key`` opens: whether there was one."""
    done = _run(["luksRemoveKey", "--batch-mode", "--key-file", "-", device], key)
    if done.returncode == _WRONG_KEY:
        return False
    _checked(done, f"removing the previous key-encryption key from {device}")
    return True


def erase(device: str) -> None:
    """Destroy every keyslot (crypto-erase): without the volume key the data
    is noise, and no copy of that key is left anywhere."""
    _checked(_run(["luksErase", "--batch-mode", device]), f"erasing the keyslots of {device}")


def unlock(device: str, name: str, keys: Keys, *, blank: bool, what: str) -> tuple[str, bool]:
    """The open mapping of an encrypted LV, and whether its header was made
    just now (its payload then holds nothing). A blank LV is given a header;
    one that holds anything else but a LUKS2 header is never formatted over
    nor opened as plain (DATA_LOSS). With a previous key the volume is
    re-wrapped with the current one (KEK rotation, no data rewritten)."""
    if is_open(name):
        if backing_device(name) != fs.device_number(device):
            raise FailedPrecondition(
                f"an encrypted mapping {name} is open on another device; close it "
                f"(cryptsetup close {name}) if it is stale"
            )
        return mapping_path(name), False
    made = False
    if blank or _never_formatted(device):
        format_device(device, keys.key)
        made = True
    elif not is_luks(device):
        raise DataLoss(
            f"{what} is encrypted but its LV {device} holds no LUKS2 header (damaged, or the "
            "volume was never encrypted); csi-lvm neither formats over it nor opens it as "
            "plain: restore the header from a backup (cryptsetup luksHeaderRestore) or delete "
            "the volume"
        )
    try:
        path = open_mapping(device, name, keys.key)
    except WrongKey:
        if keys.previous is None:
            raise WrongKey(
                f"the node-stage secret's '{KEY_FIELD}' does not open {what}: it was wrapped "
                f"by another key-encryption key; while rotating keys, put the old one in "
                f"'{PREVIOUS_KEY_FIELD}'"
            ) from None
        try:
            path = open_mapping(device, name, keys.previous)
        except WrongKey:
            raise WrongKey(
                f"neither '{KEY_FIELD}' nor '{PREVIOUS_KEY_FIELD}' of the node-stage secret "
                f"opens {what}"
            ) from None
        rewrap(device, keys.previous, keys.key)
        return path, made
    if keys.previous is not None and keys.previous != keys.key:
        drop_key(device, keys.previous)  # a rotation cut short after its new keyslot
    return path, made


def _never_formatted(device: str) -> bool:
    """Whether the header's place reads zeros: never given a header (a thick
    LV is zeroed when made). A probe would not do: ciphertext behind a
    damaged header looks like nothing to blkid, and must not be formatted."""
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        start = os.pread(fd, HEADER_BYTES, 0)
        return start == bytes(len(start))
    finally:
        os.close(fd)
