"""The status board and what feeds it: dependency checks and the monitor that runs them.

Internal: the public names are re-exported by :mod:`petsage_grpc`. Imports nothing else
of the package but ``petsage_grpc._durations``.
"""
