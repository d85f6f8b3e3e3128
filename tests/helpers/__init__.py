"""Test helpers: tiny models and graph utilities shared by the unit tests."""
