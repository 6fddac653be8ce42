"""DeepSpeed's ds_to_universal (a checkpoint -> its universal format, for a resume on another
world size or ZeRO stage), run as ``python -m dist_lm.train.to_universal`` by
:func:`dist_lm.train.restore.convert_to_universal` with DeepSpeed's own arguments.

Why not DeepSpeed's module directly: it unpickles the checkpoint's files in full. This process
inherits the weights-only loading of the process that starts it (restore.impose_weights_only)
and allows the DeepSpeed types those files hold (restore.allow_deepspeed_types), as the
training process itself does.
"""

from __future__ import annotations

import multiprocessing

from dist_lm.train.restore import allow_deepspeed_types


def main() -> None:
    from deepspeed.checkpoint import ds_to_universal

    # Its worker processes must inherit the allowed types: fork, whatever the platform's default.
    multiprocessing.set_start_method("fork", force=True)
    allow_deepspeed_types()
    ds_to_universal.main(ds_to_universal.parse_arguments())


if __name__ == "__main__":
    main()
