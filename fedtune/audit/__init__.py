"""Audits of what a run's privacy statement promises: attacks run against the real code."""
