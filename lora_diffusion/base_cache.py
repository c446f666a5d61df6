"""The frozen base's last hidden states, computed once per input and kept (`train --cache-base`).

A method that only reads the base's last hidden states (LoRA-Diffusion with injection
`final`) leaves the base frozen and untouched: the states at a training step depend only on
the noised example. With short answers the noised examples are few: a 2-token answer (a
word and [SEP]) can be masked in 3 ways, so a run that sees each example several times
meets the same inputs again and again. The cache runs the body once per input and keeps
the states at the positions the loss reads; afterwards a step is the adapter and the LM
head alone.

Two things differ from training without it, both stated in the run's results:
* the cached states are the base's without dropout (a kept state is one draw for good;
  without the cache every step draws the base's dropout anew);
* it pays only when inputs repeat: an example drawn once costs a body pass as before.

Where its inputs repeat the cache grows to at most `max_mb` (then it stops keeping new
states, and a miss runs the body as usual).
"""

from __future__ import annotations

import hashlib

import torch


class BaseStateCache:
    """The base's last hidden states [n, d] at the read positions of each input seen, kept by input."""

    KEY_BYTES = 16  # each input is kept under a 16-byte digest of itself, counted in the cap

    def __init__(self, max_mb: float = 2048.0):
        self.max_bytes = int(max_mb * 2 ** 20)
        self.states: dict[bytes, torch.Tensor] = {}
        self.bytes = 0
        self.hits = self.misses = 0

    @classmethod
    def keys(cls, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor) -> list[bytes]:
        """Each row as the body sees it: its real tokens and where it is read, not the batch's padding
        (`collate` pads on the right, so the real tokens of a row are the same however long its batch)."""
        ids, real, read = (x.cpu().numpy() for x in (input_ids, attention_mask.bool(), positions.bool()))
        return [hashlib.blake2b(row[mask].tobytes() + b"|" + where[mask].tobytes(), digest_size=cls.KEY_BYTES).digest()
                for row, mask, where in zip(ids, real, read)]

    def __call__(self, backbone, input_ids, attention_mask, positions) -> torch.Tensor:
        """h [B, L, d]: the body's last hidden states at `positions` (kept, or computed now), zero elsewhere."""
        keys = self.keys(input_ids, attention_mask, positions)
        missing = [i for i, k in enumerate(keys) if k not in self.states]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        fresh = {}
        if missing:
            rows = torch.tensor(missing, device=input_ids.device)
            was_training = backbone.mlm.training
            backbone.mlm.eval()  # no dropout: a kept state must be the base's own
            try:
                with torch.no_grad():
                    h = backbone.hidden_states(input_ids[rows], attention_mask[rows])
            finally:
                backbone.mlm.train(was_training)
            for j, i in enumerate(missing):
                fresh[i] = h[j][positions[i]]  # boolean indexing copies: the batch's h is not kept alive
                if keys[i] not in self.states and self.bytes + self._size(fresh[i]) <= self.max_bytes:
                    self.states[keys[i]] = fresh[i]
                    self.bytes += self._size(fresh[i])
        states = [fresh[i] if i in fresh else self.states[k] for i, k in enumerate(keys)]
        out = torch.zeros(*input_ids.shape, backbone.hidden_size, dtype=states[0].dtype, device=input_ids.device)
        out[positions] = torch.cat(states).to(out.dtype)  # row by row, as boolean indexing reads them
        return out

    def _size(self, state: torch.Tensor) -> int:
        return state.nbytes + self.KEY_BYTES

    def summary(self) -> dict:
        """What the cache did, for the run's results."""
        seen = self.hits + self.misses
        return {"inputs_kept": len(self.states), "kept_mb": round(self.bytes / 2 ** 20, 1),
                "hits": self.hits, "misses": self.misses, "hit_rate": round(self.hits / seen, 4) if seen else None}
