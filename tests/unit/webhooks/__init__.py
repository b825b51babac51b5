"""Unit tests of the webhooks package."""
