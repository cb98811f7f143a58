# Local stand-in for python:3.11-slim-bookworm on hosts that cannot pull from a registry: built
# FROM a slimmed Debian rootfs made with debootstrap and `docker import` (invoke base-image;
# stages/common/docker_runtime.py: make_base_image). Debian's python3 (3.11) and venv, nothing else.
ARG ROOTFS_IMAGE=kiln-rootfs:bookworm
FROM ${ROOTFS_IMAGE}
ENV LANG=C.UTF-8
RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends python3 python3-venv ca-certificates; \
    rm -rf /var/lib/apt/lists/*; \
    python3 -m venv --help > /dev/null; \
    python3 --version
CMD ["python3"]
