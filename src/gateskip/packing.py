"""Token batching of training text: texts joined by EOS into one token stream, cut into rows of
``seq_len`` tokens (BOS first) and served as endless, reshuffled, resumable batches (``PackedBatches`` /
``pack``) or as a fixed list of batches for calibration and evaluation (``fixed_batches``);
``gateskip.data`` re-exports them."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from gateskip.errors import GateSkipError


class PackedBatches(Iterator[torch.Tensor]):
    """Endless [batch_size, seq_len] LongTensor batches of packed text, reshuffled every epoch.

    Texts are joined by EOS into one token stream and cut into rows of exactly seq_len tokens (a
    BOS first when the tokenizer has one and add_bos is set). ``state_dict`` holds the epoch and
    position, so a resumed run sees exactly the batches an uninterrupted run would.
    """

    def __init__(self, tokenizer, texts: list[str], seq_len: int, batch_size: int, seed: int = 0,
                 add_bos: bool = True):
        if seq_len < 2 or batch_size < 1:
            raise GateSkipError(f"need seq_len >= 2 and batch_size >= 1, got {seq_len} and {batch_size}")
        bos = tokenizer.bos_token_id if add_bos else None
        eos = tokenizer.eos_token_id
        stream: list[int] = []
        for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
            stream.extend(ids)
            if eos is not None:
                stream.append(eos)
        body = seq_len - (bos is not None)
        n_rows = len(stream) // body
        rows = torch.tensor(stream[: n_rows * body], dtype=torch.long).view(n_rows, body)
        if bos is not None:
            rows = torch.cat([torch.full((n_rows, 1), bos, dtype=torch.long), rows], dim=1)
        self.rows, self.seq_len, self.batch_size, self.seed = rows, seq_len, batch_size, seed
        # Drop each epoch's incomplete last batch so every batch has the same shape.
        self.batches_per_epoch = n_rows // batch_size
        if self.batches_per_epoch == 0:
            raise GateSkipError(
                f"texts give {n_rows} rows of {seq_len} tokens, fewer than batch_size={batch_size}: "
                "add text or lower seq_len/batch_size"
            )
        self.epoch, self.position = 0, 0
        self._perm_epoch, self._perm = -1, None

    def _order(self) -> torch.Tensor:
        if self._perm_epoch != self.epoch:  # a fresh, reproducible shuffle per (seed, epoch)
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._perm, self._perm_epoch = torch.randperm(len(self.rows), generator=g), self.epoch
        return self._perm

    def __next__(self) -> torch.Tensor:
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        start = self.position * self.batch_size
        idx = self._order()[start : start + self.batch_size]
        self.position += 1
        return self.rows[idx]

    def __iter__(self) -> PackedBatches:
        return self

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "n_rows": len(self.rows), "seq_len": self.seq_len, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seed", "n_rows", "seq_len", "batch_size"):
            if state[key] != mine[key]:
                raise GateSkipError(f"data state was saved with {key}={state[key]}, now {mine[key]}: "
                                    "resume with the same texts, tokenizer and data settings")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def pack(tokenizer, texts: list[str], seq_len: int, batch_size: int, seed: int = 0,
         add_bos: bool = True) -> PackedBatches:
    """Endless shuffled batches of packed token rows; see ``PackedBatches``."""
    return PackedBatches(tokenizer, texts, seq_len, batch_size, seed=seed, add_bos=add_bos)


def fixed_batches(tokenizer, texts: list[str], seq_len: int, batch_size: int, n_batches: int) -> list[torch.Tensor]:
    """n_batches distinct packed batches (same every call), for calibration and evaluation."""
    it = pack(tokenizer, texts, seq_len, batch_size, seed=0)
    if n_batches > it.batches_per_epoch:
        raise GateSkipError(f"texts give only {it.batches_per_epoch} batches of {batch_size}x{seq_len}, "
                            f"{n_batches} asked: add text or ask for fewer batches")
    return [next(it) for _ in range(n_batches)]
