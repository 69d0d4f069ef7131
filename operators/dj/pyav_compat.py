"""Data-Juicer 1.6 with the PyAV that bricks uses.

Data-Juicer pins PyAV 13 (its `vision` extra); bricks needs PyAV 17 or later. One call differs
for the operators bricks runs: Data-Juicer's `close_video` closes each video stream with
`stream.close(strict=False)`, which PyAV 14 removed (a stream no longer owns anything to
close; closing the container frees it), so every video operator that closes its file would
fail on every sample. `patch_close_video` replaces that function, in Data-Juicer's modules
that imported it, by one that closes the container alone. Nothing is written to Data-Juicer's
files; with a PyAV whose streams still have `close`, nothing is replaced.
"""

from __future__ import annotations

import sys

import av


def close_container(container) -> None:
    """Data-Juicer's `close_video` for PyAV 14 and later: the container frees its streams."""
    container.close()


def streams_have_close() -> bool:
    return hasattr(av.video.stream.VideoStream, "close")


def patch_close_video() -> None:
    """Use `close_container` wherever Data-Juicer's modules bound `close_video` (call after
    importing `data_juicer.ops`: each operator module holds its own reference)."""
    if streams_have_close():
        return
    from data_juicer.utils import mm_utils

    original = mm_utils.close_video
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] == "data_juicer" and getattr(module, "close_video", None) is original:
            module.close_video = close_container
