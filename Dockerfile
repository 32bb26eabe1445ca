# One image for the aggregator, Flower and volunteers. CPU torch by default; the
# volunteer-gpu service builds it with TORCH_PIP_ARGS="" (PyPI's CUDA wheels).
FROM python:3.11-slim

ARG TORCH_PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CROWDTRAIN_HOME=/data

WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY serialization ./serialization
COPY jobs ./jobs
COPY broker ./broker
COPY tasks ./tasks
COPY coordinator ./coordinator
COPY volunteer ./volunteer
COPY cli ./cli
# torch==2.13.0 from constraints.txt; the CPU index serves it as 2.13.0+cpu
RUN pip install $TORCH_PIP_ARGS -c constraints.txt .

# Never run training code, or Celery, as root.
RUN useradd --create-home --uid 10001 crowdtrain \
    && mkdir -p /data && chown crowdtrain /data
USER crowdtrain
VOLUME /data
EXPOSE 5555 9100
CMD ["volunteer", "start", "--device", "cpu"]
