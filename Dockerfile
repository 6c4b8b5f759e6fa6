# One image for every epochlens service; docker-compose.yml picks the command.
FROM python:3.11-slim

WORKDIR /app
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY services ./services
COPY trainer_client ./trainer_client
RUN pip install --no-cache-dir . && useradd --system --uid 10001 epochlens
USER epochlens
ENV PYTHONUNBUFFERED=1
