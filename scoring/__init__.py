"""The scoring core: tokens, model files, layouts, one batch scheduler, the device process; no Celery."""
