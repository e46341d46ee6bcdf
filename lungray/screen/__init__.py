"""Nightly screening of archives: streaming inference, per-image and per-study tables, atomic runs."""
