"""The parts of ``scripts/soak.py``, the soak and drain-under-load run (docs/reliability.md).

``common`` what every part shares; ``server`` the server under test as a child process;
``load`` channels and unary load; ``watchers`` Watch slots; ``checkpoints`` the flipper's
convergence checks; ``soak_phase`` the soak and the return to baseline; ``drain`` the
drain under load; ``report`` figures and the printed summary.
"""
