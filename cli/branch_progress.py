"""Progress of ``scaler branch add`` on stderr: a rich bar on a terminal, plain lines elsewhere.

Off a terminal (a CI log, ``2> file``, a pipe) a live bar prints nothing until it ends, so each
epoch and every tenth of a long pass gets one plain line instead. Reading a big data file is a
pass too (``reading data: 40/200 MB``), shown from its first chunk (issue 10 item 19).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich.console import Console

#: plain mode prints a line each time a pass crosses another tenth of its rows
PLAIN_STEPS = 10
#: (issue 10 item 19) a data file this big or bigger gets a "reading data" bar / lines
READ_PROGRESS_MIN_BYTES = 4_000_000
MB = 1_000_000


class BranchProgress:
    """The ``report`` and ``progress_factory`` callbacks of ``add_branch``."""

    def __init__(
        self, console: Console, *, plain: bool | None = None, min_read_bytes: int = READ_PROGRESS_MIN_BYTES
    ) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.console = console
        self.plain = (not console.is_terminal) if plain is None else plain
        self.min_read_bytes = min_read_bytes
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        self.epochs: int | None = None
        self._epoch_task: Any = None

    def _line(self, text: str) -> None:
        if self.progress.live.is_started:
            self.progress.console.print(text, markup=False)
        else:
            self.console.print(text, markup=False)

    def factory(self, desc: str, total: int) -> Callable[[int], None]:
        """A callback advancing a pass of ``total`` rows; nothing shows until the first rows are
        done (a pass served from a cache never advances).

        (issue 10 item 19) A ``reading ...`` pass counts bytes and shows megabytes; a file under
        ``min_read_bytes`` reads in a blink and gets no bar or line."""
        if desc.startswith("reading"):
            return self._bytes(desc, total)
        return self._rows(desc, total, "rows")

    def _bytes(self, desc: str, total: int) -> Callable[[int], None]:
        if total < self.min_read_bytes:
            return lambda _n: None
        units = -(-total // MB)
        inner = self._rows(desc if self.plain else f"{desc} (MB)", units, "MB")
        got = [0, 0]  # bytes read, megabytes shown

        def advance(n: int) -> None:
            got[0] += n
            shown = units if got[0] >= total else min(units, got[0] // MB)
            if shown > got[1]:
                inner(shown - got[1])
                got[1] = shown

        return advance

    def _rows(self, desc: str, total: int, unit: str) -> Callable[[int], None]:
        done = [0]
        every = max(1, -(-total // PLAIN_STEPS))
        task: list[Any] = []

        def advance(n: int) -> None:
            before, done[0] = done[0], done[0] + n
            if not self.plain:
                if not task:
                    self.progress.start()
                    task.append(self.progress.add_task(desc, total=total))
                self.progress.advance(task[0], n)
            elif done[0] // every > before // every or (done[0] >= total > before):
                self._line(f"{desc}: {min(done[0], total)}/{total} {unit}")

        return advance

    def report(self, event: str, info: dict[str, Any]) -> None:
        if event == "data":
            from scaler_wizard.training.data import summarize_counts  # the runtime: only when used

            self._line(
                f"data: {info['train']} train / {info['eval']} eval rows; "
                f"classes: {summarize_counts(info['counts'])}"
            )
            for warning in info.get("warnings") or []:
                self._line(f"warning: {warning}")
        elif event == "small_data_config":  # (issue 12) the strategy's small-data defaults
            fields = ", ".join(f"{k}={v}" for k, v in info["config"].items())
            self._line(f"note: small data: {info['strategy']} with {fields} (set it with --strategy-config)")
        elif event == "features" and info["cached"]:
            self._line("trunk features: from cache")
        elif event == "training":
            self.epochs = int(info["epochs"])
            if info.get("early_stop"):  # (issue 12) say why early stopping is off
                self._line(f"note: {info['early_stop']}")
        elif event == "epoch":
            text = (
                f"epoch {info['epoch']}{f'/{self.epochs}' if self.epochs else ''}: "
                f"loss {info['train_loss']:.3f} eval acc {info['eval_accuracy']:.3f}"
                f"{epoch_mark(info)}"
            )
            if self.plain:
                self._line(f"training: {text}")
                return
            if self._epoch_task is None:
                self.progress.start()
                self._epoch_task = self.progress.add_task("training (epochs)", total=self.epochs)
            self.progress.update(self._epoch_task, advance=1, description=f"training: {text}")

    def stop(self) -> None:
        if self.progress.live.is_started:  # stop() on a never-started bar still prints a blank line
            self.progress.stop()


def epoch_mark(info: dict[str, Any]) -> str:
    """(issue 12) Macro-F1 (what picks the saved epoch) and which epoch will be saved, so the
    live line agrees with the saved branch."""
    text = f" macro-F1 {info['eval_macro_f1']:.3f}" if "eval_macro_f1" in info else ""
    if info.get("kept") == "last":
        return text + " (the last epoch is saved)"
    return text + (" (best so far: saved)" if info.get("best") else "")
