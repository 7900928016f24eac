"""The fleet view: every replica behind a DNS name (or a list), followed over Watch."""
