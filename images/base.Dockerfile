# Local stand-in for python:3.11-slim-bookworm on hosts that cannot pull from a registry:
# built FROM a Debian rootfs made with debootstrap and `docker import` (invoke base-image).
ARG ROOTFS_IMAGE=kiln-rootfs:bookworm
FROM ${ROOTFS_IMAGE}
RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends python3 python3-venv ca-certificates; \
    rm -rf /var/lib/apt/lists/*; \
    python3 -m venv --help > /dev/null
CMD ["python3"]
