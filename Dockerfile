# The supervisor's own image (massgen-supervisor as a service, see compose.yaml).
# Built OFFLINE by scripts/build-supervisor-image.sh: its context holds wheels/ (the host-built
# wheelhouse plus a wheel of this project) and configs/, and the build runs with --network none.
# Sandboxes still use the agent image; this one only talks to the host's Docker engine.
ARG BASE_IMAGE=massgen-sandbox/base:bookworm

# Wheels are installed in a throwaway stage so the final image never carries them.
FROM ${BASE_IMAGE} AS deps
LABEL io.massgen.image=supervisor-deps
COPY wheels/ /build/wheels/
RUN python3 -m pip install --no-index --find-links /build/wheels --no-cache-dir \
        --disable-pip-version-check --root-user-action=ignore --break-system-packages \
        massgen-sandbox \
    && python3 -c 'import supervisor.daemon, supervisor.metrics, docker, aiohttp, prometheus_client'

FROM ${BASE_IMAGE}
COPY --from=deps /usr/local /usr/local
COPY configs/ /opt/massgen/configs/
# Installed from a wheel, the code cannot find configs/ next to itself: @examples/NAME and the
# price table come from here. Root, because the engine's socket is root's (and so are bind
# mounts it creates for sandboxes); sandboxes themselves still run as uid 10001.
ENV MASSGEN_EXAMPLES_DIR=/opt/massgen/configs \
    MASSGEN_PRICING_FILE=/opt/massgen/configs/pricing.json \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
ENTRYPOINT ["massgen-supervisor"]
