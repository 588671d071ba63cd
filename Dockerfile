# syntax=docker/dockerfile:1
# The scangate operator image. Scan Jobs run the Trivy image, not this one.
# Two stages: wheels are built with pip in the first; the second holds only the
# interpreter, the installed package and its runtime dependencies, and runs as non-root.
ARG PYTHON=python:3.11.11-slim-bookworm

FROM ${PYTHON} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM ${PYTHON}
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels scangate \
    && rm -rf /root/.cache
USER 65532:65532
ENTRYPOINT ["scangate"]
CMD ["run"]
