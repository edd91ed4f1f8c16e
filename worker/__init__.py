"""Celery workers that score query-passage pairs with a BGE cross-encoder."""
