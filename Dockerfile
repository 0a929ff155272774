# The Sluice image: `sluice operator` in a cluster, `sluice simulate` for e2e model servers.
# Non-root, no shell needed at run time, works with a read-only root filesystem (the picker
# keeps its self-signed certificate in memory; /tmp is the only writable path it uses).
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY epp ./epp
COPY operator ./operator
COPY sluice ./sluice
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[operator]"

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1
COPY --from=build /wheels /wheels
RUN pip install --no-index --find-links=/wheels "sluice[operator]" && rm -rf /wheels
USER 65532:65532
EXPOSE 9002 9003 9090 8080
ENTRYPOINT ["sluice"]
CMD ["operator", "--help"]
