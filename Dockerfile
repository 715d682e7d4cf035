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
# How ArtServe runs Ray Serve (serve_app/ray_env.py says why; a unit test keeps the two equal).
ENV RAY_SERVE_USE_GRPC_BY_DEFAULT=1 \
    RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH=2147483647 \
    RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0 \
    RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0 \
    RAY_SERVE_FREEZE_GC_ON_STARTUP=1 \
    RAY_SERVE_COLLECT_AUTOSCALING_METRICS_ON_HANDLE=0
