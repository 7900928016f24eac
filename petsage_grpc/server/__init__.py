"""The standalone server: settings and configuration file, listeners, TLS, the HTTP face.

Internal: :func:`petsage_grpc.serve` and ``petsage-grpc serve`` are the ways in. Imports the
services and the board, never the command line.
"""
