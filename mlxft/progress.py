"""Progress bars for long loops: training steps, `mlxft evaluate`'s examples, and the bytes
computed by convert and fuse (`mlxft.mlx_backend.arrays.numpy_weights`) and written by the
GGUF export.

tqdm draws them: it is already installed with transformers and huggingface_hub, it computes
the rate and ETA itself (correctly from a non-zero start on resume), and it can clear its
line for a message and redraw after it.  A bar is drawn on a terminal only: in a log file or
a pipe it is switched off entirely (no carriage returns in logs).
"""

from __future__ import annotations

import sys

from tqdm import tqdm


def on_terminal(quiet: bool = False) -> bool:
    """True when a bar should be drawn: stderr is a terminal and the caller is not quiet."""
    return not quiet and sys.stderr.isatty()


def bar(
    total: int,
    desc: str,
    unit: str = "it",
    initial: int = 0,
    enabled: bool | None = None,
    unit_scale: bool = False,
) -> tqdm:
    """A bar on stderr that disappears when done (`leave=False`: the console keeps the
    messages, not the bars); a no-op object with the same methods when not `enabled`
    (default: `on_terminal()`)."""
    enabled = on_terminal() if enabled is None else enabled
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        unit_scale=unit_scale,
        leave=False,
        disable=not enabled,
        file=sys.stderr,
        dynamic_ncols=True,
    )


def message(progress: tqdm, write) -> None:
    """Call `write()` (which prints a line) with the bar cleared first and redrawn after."""
    if progress.disable:
        write()
        return
    with progress.external_write_mode(file=sys.stdout):
        write()
