"""Drop-in fast backends for other merging tools: each module is a thin adapter, imported only when used,
whose peer is an optional extra (``pip install fastmerge[mergekit]``)."""
