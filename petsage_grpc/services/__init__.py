"""The gRPC services, thin adapters over the board: Health, SmokeTest, reflection.

Internal: :func:`petsage_grpc.add_to_server` is the way in. Imports the board, never the
standalone server or the command line.
"""
