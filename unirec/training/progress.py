"""A per-epoch progress bar: tqdm when installed, else a plain one on stderr."""
from __future__ import annotations

import sys
import time


class Progress:
    """``with Progress(total, desc) as p: p.update(n_tokens, loss)`` shows steps, loss and tokens/s."""

    def __init__(self, total: int, desc: str = "", enabled: bool = True, stream=None):
        self.total, self.desc, self.enabled = total, desc, enabled
        self.stream = stream or sys.stderr
        self.n = self.tokens = 0
        self.loss = float("nan")
        self.t0 = time.perf_counter()
        self._tqdm = None
        if enabled:
            try:
                from tqdm import tqdm
                self._tqdm = tqdm(total=total, desc=desc, leave=True, file=self.stream)
            except ImportError:
                pass

    def update(self, tokens: int, loss: float) -> None:
        self.n += 1
        self.tokens += tokens
        self.loss = loss if self.n == 1 else 0.9 * self.loss + 0.1 * loss
        if not self.enabled:
            return
        rate = self.tokens / max(time.perf_counter() - self.t0, 1e-9)
        if self._tqdm is not None:
            self._tqdm.set_postfix(loss=f"{self.loss:.4f}", tok_s=f"{rate:,.0f}")
            self._tqdm.update(1)
            return
        width = 24
        done = int(width * self.n / max(self.total, 1))
        self.stream.write(f"\r{self.desc} [{'#' * done}{'.' * (width - done)}] {self.n}/{self.total} "
                          f"loss {self.loss:.4f} {rate:,.0f} tok/s")
        self.stream.flush()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def close(self, suffix: str = "") -> None:
        if not self.enabled:
            return
        if self._tqdm is not None:
            if suffix:
                self._tqdm.write(suffix)
            self._tqdm.close()
        else:
            self.stream.write((f" | {suffix}" if suffix else "") + "\n")
            self.stream.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
