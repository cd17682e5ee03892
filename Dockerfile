# sslkd in a container: `docker run` runs the MKDT study (`dvc repro`) in /workspace, which a volume
# mounts so that results/, artifacts/, dvc.lock and the MLflow store land on the host. An empty
# workspace is first seeded with the study (dvc.yaml, params.yaml, gin/, sslkd/) as a git repository.
#
#   docker build -t sslkd .
#   docker run --rm --user "$(id -u):$(id -g)" -v "$PWD/study:/workspace" sslkd                 # CPU
#   docker run --rm --user "$(id -u):$(id -g)" -v "$PWD/study:/workspace" --gpus all sslkd      # GPU
#   docker run --rm --user "$(id -u):$(id -g)" -v "$PWD/study:/workspace" sslkd distill --bind 'sslkd.distill.iterations = 10'
#
# BASE_IMAGE: a Debian-like image whose `python3` is 3.11+ with venv and pip: the official python image
# or Debian with python3-venv. torch==2.14.1 from PyPI is the CUDA build and carries its own CUDA
# runtime, so one image runs on CPU-only hosts and, with `--gpus all`, on hosts with the NVIDIA driver
# and container toolkit. See README, "Container".
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

# Extra package indexes for this build only (e.g. a local mirror holding the torch wheels), searched
# besides PyPI. Build arguments, not ENV: nothing of them stays in the image.
ARG PIP_EXTRA_INDEX_URL
ARG PIP_TRUSTED_HOST

# PYTHONDONTWRITEBYTECODE: the workspace's sslkd/ is a DVC dependency of every stage; bytecode caches
# written into it would change its hash and make every `dvc repro` rerun the study.
ENV VIRTUAL_ENV=/opt/sslkd/venv \
    PATH=/opt/sslkd/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DVC_NO_ANALYTICS=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    DO_NOT_TRACK=true \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# git: the workspace is a git repository, so `dvc exp`, `dvc params diff` and the code version in the
# artifact sidecars work. Not version-pinned on purpose: Debian removes superseded package versions from
# its archive, so an exact pin stops building at the next point release; the Python stack is pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 --user-group --shell /bin/bash sslkd

# The dependencies first, from pyproject.toml alone (a code change then rebuilds in seconds, not the
# ~6 GB torch layer); then the package itself from the copied source, without touching them.
COPY pyproject.toml /opt/sslkd/src/
WORKDIR /opt/sslkd/src
RUN python3 -m venv "$VIRTUAL_ENV" \
    && python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > requirements.txt \
    && pip install --no-cache-dir -r requirements.txt
COPY README.md ./
COPY sslkd ./sslkd
RUN pip install --no-cache-dir --no-deps . \
    && pip check \
    && sslkd --help > /dev/null

# The study an empty workspace is seeded with: what `dvc repro` needs, and the code its stages depend on.
COPY dvc.yaml dvc.lock params.yaml .dvcignore .gitignore /opt/sslkd/study/
COPY .dvc/config /opt/sslkd/study/.dvc/config
COPY gin /opt/sslkd/study/gin
COPY sslkd /opt/sslkd/study/sslkd
COPY docker/entrypoint.sh /usr/local/bin/sslkd-entrypoint

WORKDIR /workspace
RUN chown 1000:1000 /workspace
USER 1000:1000

ENTRYPOINT ["sslkd-entrypoint"]
CMD ["dvc", "repro"]
