"""Progress reporting: a bar with bytes/s on a terminal, a few plain lines otherwise.

CI logs are not terminals: there a line every ~10 % keeps the log readable.
"""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, desc: str, total: int, log=None, stream=None):
        self.desc, self.total, self.done = desc, max(int(total), 1), 0
        self.log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        self.start = time.monotonic()
        self._next_pct = 10
        stream = stream or sys.stderr
        self.bar = None
        if stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                            file=stream, leave=False, dynamic_ncols=True)

    def advance(self, n: int):
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        pct = 100 * self.done // self.total
        if pct >= self._next_pct and pct < 100:
            self._next_pct = (pct // 10 + 1) * 10
            self.log(f"  {self.desc}: {pct}% ({self._rate()})")

    def _rate(self) -> str:
        secs = max(time.monotonic() - self.start, 1e-6)
        return f"{self.done / secs / 1e6:.1f} MB/s"

    def close(self):
        if self.bar is not None:
            self.bar.close()
        self.log(f"  {self.desc}: {self.done / 1e6:.1f} MB in {time.monotonic() - self.start:.1f}s ({self._rate()})")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
