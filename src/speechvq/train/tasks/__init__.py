"""The training tasks, one per file: what :func:`speechvq.train.loop.train` trains (see :mod:`.base`)."""
