"""Helpers the tests share: tiny models, golden trees, scripted models, fixtures' building blocks."""
