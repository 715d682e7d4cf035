# The image the RayService runs (k8s/): Ray 2.60.0 + this project.
#   GPU: docker build -t REGISTRY/artserve:0.1.0-gpu .
#   CPU: docker build --build-arg BASE=rayproject/ray:2.60.0-py311-cpu --build-arg EXTRAS=gpu \
#        --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu -t REGISTRY/artserve:0.1.0-cpu .
ARG BASE=rayproject/ray:2.60.0-py311-gpu
FROM ${BASE}
ARG EXTRAS=gpu
ARG TORCH_INDEX=""
WORKDIR /home/ray/artserve
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users serve_app ./serve_app
COPY --chown=ray:users models ./models
COPY --chown=ray:users serve_config.yaml serve_config.production.yaml ./
# torchvision with torch (one resolution, matching builds): FLUX.2 [dev]'s tokenizer is a
# PixtralProcessor, which transformers builds only with torchvision.
RUN pip install --no-cache-dir ${TORCH_INDEX:+--extra-index-url ${TORCH_INDEX}} "torch>=2.6" torchvision \
 && pip install --no-cache-dir "ray[serve]==2.60.0" -e ".[${EXTRAS}]"
# Serve resolves models_dir and import paths from here.
ENV PYTHONPATH=/home/ray/artserve
