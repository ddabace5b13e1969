"""The server side around the strategies: ServerApp, round loop, run directory.

``app``: the ServerApp; ``rounds``: the round loop (train, aggregate, evaluate,
record, checkpoint); ``checkpoint``: save and resume; ``rundir``: the run
directory's files; ``table`` and ``plots``: the round table and learning curves.
"""
