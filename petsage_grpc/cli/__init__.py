"""The command line: ``serve`` (which loads the server only then), ``probe`` and ``status``.

The clients (``probe``, ``status``) import nothing of the server, so an exec probe starts
lean.
"""
