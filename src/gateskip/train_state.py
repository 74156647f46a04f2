"""Training checkpoints: what a run needs to resume exactly (trainable weights, optimizer, data position,
RNG states), written safely and read back with ``weights_only=True``.

Gates folders (what a run leaves behind for inference) are checkpoint.py's.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import torch

from gateskip import distributed as gdist
from gateskip.errors import GateSkipError
from gateskip.files import atomic_write

# A training checkpoint is ``checkpoint/step-00000050.pt`` (a torch.save dict of tensors and plain
# values, read back with weights_only=True so a crafted pickle cannot run code) plus
# ``step-00000050.pt.sha256``. The .pt is written to a temp name, hashed and test-loaded before it
# is renamed; the .sha256 is written last, so a checkpoint without a matching .sha256 is incomplete.
# The newest ``keep`` checkpoints stay on disk: if the latest is damaged, the one before is used.

CKPT_GLOB, LEGACY_CKPT = "step-*.pt", "train_state.pt"


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _ckpt_step(p: Path) -> int:
    try:
        return int(p.stem.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def list_train_states(ckpt_dir: Path) -> list[Path]:
    """Checkpoint files, newest first (a pre-checksum ``train_state.pt`` last)."""
    found = sorted((p for p in Path(ckpt_dir).glob(CKPT_GLOB) if _ckpt_step(p) >= 0), key=_ckpt_step, reverse=True)
    legacy = Path(ckpt_dir) / LEGACY_CKPT
    return found + ([legacy] if legacy.is_file() else [])


def save_train_state(ckpt_dir: Path, state: dict, step: int, keep: int = 2, write=torch.save) -> Path:
    """Write a verified checkpoint for ``step``; then drop all but the newest ``keep``.

    ``write(obj, path)`` does the serialising (a parameter so tests can make it fail midway). On
    any error nothing new is left on disk and the earlier checkpoints are untouched.
    """
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for stale in ckpt_dir.glob(".step-*.tmp"):  # left by a process killed while writing
        stale.unlink(missing_ok=True)
    path = ckpt_dir / f"step-{step:08d}.pt"
    digest = {}

    def write_verified(tmp: str) -> None:
        write(state, tmp)
        digest["sha"] = sha256_of(tmp)
        torch.load(tmp, map_location="cpu", weights_only=True)  # readable back, before it replaces anything

    atomic_write(path, write_verified)
    try:
        atomic_write(path.with_name(path.name + ".sha256"), lambda p: Path(p).write_text(digest["sha"] + "\n"))
    except BaseException:
        path.unlink(missing_ok=True)  # without its checksum the new file would not count: remove it
        raise
    for old in list_train_states(ckpt_dir)[keep:]:
        old.unlink(missing_ok=True)
        old.with_name(old.name + ".sha256").unlink(missing_ok=True)
    return path


def load_train_state(ckpt_dir: Path, warn=None) -> tuple[dict, Path] | None:
    """The newest checkpoint that passes its checksum and loads, or None when there is none.

    A damaged newer checkpoint is reported through ``warn(message)`` and the previous one is used;
    if every checkpoint is damaged, GateSkipError.
    """
    problems = []
    for path in list_train_states(ckpt_dir):
        sha_file = path.with_name(path.name + ".sha256")
        reason = None
        if path.name != LEGACY_CKPT:
            if not sha_file.is_file():
                reason = "no checksum: it was never completed"
            elif sha_file.read_text().strip() != sha256_of(path):
                reason = "checksum mismatch"
        if reason is None:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                if not isinstance(state, dict) or "step" not in state or "trainable" not in state:
                    raise ValueError("not a gateskip training checkpoint")
            except Exception as e:  # noqa: BLE001 - unreadable for any reason means: try the previous one
                reason = f"unreadable: {type(e).__name__}"
        if reason is None:
            if problems and warn is not None:
                warn(f"checkpoint {problems[-1][0].name} is damaged ({problems[-1][1]}); "
                     f"resuming from the previous good one, {path.name}")
            return state, path
        problems.append((path, reason))
    if problems:
        names = ", ".join(f"{p.name} ({r})" for p, r in problems)
        raise GateSkipError(f"no usable checkpoint in {ckpt_dir}: {names}; delete the folder or pass --no-resume")
    return None


# ---- the training loop's state ---------------------------------------------------------------

def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:
        return state
    ns = np.random.get_state(legacy=False)  # plain ints + one uint32 array: stored as a tensor
    state["numpy"] = {"key": torch.from_numpy(ns["state"]["key"].astype("int64")), "pos": int(ns["state"]["pos"]),
                      "has_gauss": int(ns["has_gauss"]), "gauss": float(ns["gauss"])}
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np
        n = state["numpy"]
        np.random.set_state({"bit_generator": "MT19937", "state": {"key": n["key"].numpy().astype("uint32"),
                             "pos": n["pos"]}, "has_gauss": n["has_gauss"], "gauss": n["gauss"]})


def _write_state(state: dict, path: str) -> None:
    torch.save(state, path)  # a module-level hook: tests replace it to simulate a full disk


def save_checkpoint(ckpt: Path, net, opt, stream, step: int, keep: int = 2, schedule: dict | None = None,
                    gathered: tuple[dict, dict] | None = None) -> None:
    if gathered is None:
        trainable = {k: v.detach().cpu() for k, v in net.named_parameters() if v.requires_grad}
        optim = opt.state_dict()
    else:
        trainable, optim = gathered
    data = stream.state_dict() if hasattr(stream, "state_dict") else {}
    # The LR and skip-ratio schedules are functions of the step: the step is their whole state.
    state = {"step": step, "trainable": trainable, "optimizer": optim, "data": data, "fsdp": gathered is not None,
             "schedule": schedule or {}, "rng": _rng_state()}
    save_train_state(ckpt, state, step, keep=keep, write=lambda s, p: _write_state(s, p))


def load_checkpoint(ckpt: Path, net, opt, stream, warn=None, fsdp: bool = False) -> int:
    """Restore the newest good checkpoint under ``ckpt``; return its step (0 when there is none)."""
    found = load_train_state(ckpt, warn=warn)
    if found is None:
        return 0
    state, path = found
    if bool(state.get("fsdp", False)) != fsdp:
        raise GateSkipError(f"checkpoint {path} was written {'with' if state.get('fsdp') else 'without'} --fsdp: "
                            "resume the same way, or use another --out")
    if fsdp:
        _load_sharded(net, opt, state, path)
    else:
        _load_plain(net, opt, state, path, ckpt)
    if hasattr(stream, "load_state_dict") and state.get("data"):
        stream.load_state_dict(state["data"])
    if "rng" in state:
        _set_rng_state(state["rng"])
    elif "torch_rng" in state:  # written before RNG states were grouped
        torch.set_rng_state(state["torch_rng"])
    return int(state["step"])


def _load_sharded(net, opt, state: dict, path: Path) -> None:
    try:
        gdist.load_sharded(net, opt, state)
    except (RuntimeError, KeyError, ValueError) as e:
        raise GateSkipError(f"checkpoint {path} does not fit this model or settings "
                            f"({str(e).splitlines()[0][:80]}): use another --out") from None


def _load_plain(net, opt, state: dict, path: Path, ckpt: Path) -> None:
    params = dict(net.named_parameters())
    missing = set(state["trainable"]) - set(params)
    wrong = [k for k, v in state["trainable"].items() if k in params and params[k].shape != v.shape]
    if missing or wrong:
        raise GateSkipError(f"checkpoint {path} is for another configuration: delete {ckpt} or use another --out")
    with torch.no_grad():
        for k, v in state["trainable"].items():
            params[k].copy_(v)
    try:
        opt.load_state_dict(state["optimizer"])
    except (ValueError, KeyError) as e:
        raise GateSkipError(f"checkpoint {path} has optimizer state for other settings ({e}): delete {ckpt} or "
                            "use another --out") from None
