# Flux in a container: `flux serve` (gateway and CDC engine in one process) for the project
# mounted at /app. compose.yaml runs it next to a PostgreSQL configured for logical decoding.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Every dependency ships as a binary wheel for linux, so no compiler is needed.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY flux ./flux
RUN pip install . && rm -rf /src

RUN useradd --create-home --uid 1000 flux
USER flux
WORKDIR /app
EXPOSE 8000
CMD ["flux", "serve", "--attach", "--host", "0.0.0.0", "--port", "8000"]
