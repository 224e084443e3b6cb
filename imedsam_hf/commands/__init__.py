"""The commands room: what `imedsam predict | evaluate | convert | export` do with files, flags and exit codes.

The library rooms (`inference`, `volumes`, `evaluation`, `data`, `loading`) return results and raise errors naming
files and arguments; they never print or exit. Each command here checks what it can before loading a model, runs the
library, writes its files atomically and reports in the command line's words (`common.flag_message`). `cli` only
parses arguments and calls `run` of the command.
"""

from . import common, convert, evaluate, export, outputs, predict

__all__ = ["common", "convert", "evaluate", "export", "outputs", "predict"]
