"""The re-ranking contract: schemas, task and queue names, errors, settings, formats and validation.

A leaf: it imports pydantic and the standard library only, never Celery, kombu, redis or torch,
so producers, workers, the scoring core and the gateway can all share it.
"""
