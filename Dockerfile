# One image for workers, producers and Flower. PyPI's torch wheel for Linux carries CUDA.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HF_HOME=/models
WORKDIR /app
# One COPY per package pyproject.toml installs (tests/test_compose.py checks): nothing else, so no
# .env, key or test file ends up in the image.
COPY pyproject.toml README.md LICENSE ./
COPY contract ./contract
COPY producer ./producer
COPY worker ./worker
COPY gateway ./gateway
COPY scoring ./scoring
RUN pip install ".[worker,flower,gateway,tracing]"
RUN useradd --create-home rerank && mkdir -p /models && chown rerank /models
USER rerank
CMD ["rerank-worker"]
