"""Generated from proto/ by scripts/generate_stubs.py; do not edit."""
