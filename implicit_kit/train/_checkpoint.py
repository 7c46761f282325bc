"""Checkpoints: written atomically (temporary file, fsync, rename), verified on load.

A checkpoint file is a magic line, one JSON header line (metadata, the payload's length
and SHA-256) and the payload (`eqx.tree_serialise_leaves` of the training state). A
truncated or corrupted file fails the check with a `CheckpointError` naming it; earlier
checkpoints are kept (`keep`) and never touched by a failed write.
"""

import hashlib
import io
import json
import os
import pathlib
import re
import tempfile

import equinox as eqx


MAGIC = b"IMPLICIT_KIT_CHECKPOINT 1\n"
_NAME = re.compile(r"^epoch-(\d+)\.ckpt$")


class CheckpointError(RuntimeError):
    """A missing, truncated or corrupted checkpoint (the message names the file)."""


def checkpoint_path(directory, epoch: int) -> pathlib.Path:
    return pathlib.Path(directory) / f"epoch-{epoch:04d}.ckpt"


def list_checkpoints(directory) -> list[pathlib.Path]:
    """The checkpoints in `directory`, oldest first."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def atomic_write(path, data: bytes) -> None:
    """Write `data` to `path` so that `path` is either the old file or the complete new
    one, never a partial file."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(dfd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(dfd)


def save_checkpoint(directory, epoch: int, state, meta: dict, *, keep: int = 2) -> pathlib.Path:
    """Write `state` (a pytree of arrays) and JSON-able `meta` as `epoch-NNNN.ckpt` in
    `directory`, then delete all but the newest `keep` checkpoints."""
    buf = io.BytesIO()
    eqx.tree_serialise_leaves(buf, state)
    payload = buf.getvalue()
    header = {**meta, "epoch": epoch, "payload_bytes": len(payload),
              "sha256": hashlib.sha256(payload).hexdigest()}
    path = checkpoint_path(directory, epoch)
    atomic_write(path, MAGIC + json.dumps(header).encode() + b"\n" + payload)
    for old in list_checkpoints(directory)[:-max(keep, 1)]:
        old.unlink()
    return path


def read_header(path) -> tuple[dict, bytes]:
    """The verified `(header, payload)` of a checkpoint file."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist.")
    raw = path.read_bytes()
    if not raw.startswith(MAGIC):
        raise CheckpointError(f"{str(path)!r} is not an implicit_kit checkpoint (bad magic).")
    end = raw.find(b"\n", len(MAGIC))
    try:
        header = json.loads(raw[len(MAGIC):end])
        size, digest = header["payload_bytes"], header["sha256"]
    except (ValueError, KeyError):
        raise CheckpointError(f"checkpoint {str(path)!r} has a corrupt header.") from None
    payload = raw[end + 1:]
    if len(payload) != size:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is truncated: {len(payload)} of {size} payload bytes."
        )
    if hashlib.sha256(payload).hexdigest() != digest:
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt (checksum mismatch).")
    return header, payload


def load_checkpoint(path, like) -> tuple[dict, object]:
    """Load and verify a checkpoint into the structure of `like`."""
    header, payload = read_header(path)
    try:
        state = eqx.tree_deserialise_leaves(io.BytesIO(payload), like)
    except Exception as e:
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not match the model built from its config: {e}"
        ) from None
    return header, state


# Keys a resume may change: how progress is shown, and where the run lives and how many
# checkpoints it keeps (a run directory may be spelled differently, moved or copied).
_RESUME_FREE = ("train.progress", "train.checkpoint_dir", "train.keep_checkpoints")
# Keys added after checkpoints were first written, with the value that reproduces what a
# checkpoint without the key was trained with (its run resumes exactly with that value).
_ADDED_KEYS = {"train.parallel": "jit", "data.downsample": 1, "optim.separate": "",
               "optim.separate_optimiser": "sgd", "optim.separate_lr": 0.02,
               "optim.separate_schedule": "cosine", "optim.separate_every": 1,
               "model.detach_start": True, "train.on_nonfinite": "skip",
               "train.on_unconverged": "apply", "model.best_so_far": False,
               "model.cell": "conv", "model.scales": 2, "data.val_size": 0,
               "model.beta": 0.8}


def config_diff(a: dict, b: dict, prefix="") -> list[str]:
    """The dotted keys where two config dicts differ (those a resume may change
    aside). `a` is the stored config: a key it lacks (an older checkpoint) counts as
    the value that reproduces its training (`_ADDED_KEYS`)."""
    out = []
    for k in sorted(set(a) | set(b)):
        where = f"{prefix}{k}"
        stored = a.get(k, _ADDED_KEYS.get(where))
        if isinstance(stored, dict) and isinstance(b.get(k), dict):
            out += config_diff(stored, b[k], where + ".")
        elif stored != b.get(k) and where not in _RESUME_FREE:
            out.append(where)
    return out
