"""dist-lm: pretrain decoder-only language models with DeepSpeed, from one GPU to many nodes.

The package's folders are its architecture:

- ``config``: the typed schema, YAML presets and dotted overrides, batch arithmetic;
- ``model``: the transformer and its parts, each counting its own parameters, FLOPs and activations;
- ``data``: the token-shard format, its checks, the rank-aware sampler, the embedded corpus, prepare;
- ``runtime``: launcher detection and process groups, precision, DeepSpeed's config, engine, optimizer;
- ``train``: building a run (resume included), the loop, checkpoints, run state, faults, exit statuses;
- ``observe``: rank-0 log, metrics and their sinks, profiling, analysis of runs;
- ``plan``: the hardware, the memory model and the planner behind ``--config auto``;
- ``use``: a trained checkpoint outside training: inference, generation, evaluation, export;
- ``commands``: the ``dist-lm`` command's subcommands (``cli`` dispatches).
"""

__version__ = "0.1.0"
