# lmscope server image: `lmscope serve` on a portable (AVX2, no -march=native) llama.cpp CPU build.
#
#   docker build -t lmscope-server .                               # default model baked in
#   docker build -t lmscope-server --build-arg PULL_DEFAULT_MODEL=0 .   # bring your own model
#   docker run -p 50051:50051 -v $PWD/certs:/etc/lmscope:ro lmscope-server          # TLS + token (default)
#   docker run -p 50051:50051 -v $PWD/m.gguf:/models/m.gguf:ro lmscope-server \
#       --model /models/m.gguf --insecure                          # plain text: trusted networks only
#
# See docs/deployment.md (TLS files, Kubernetes probes, replicas behind one client).

FROM python:3.11-slim AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Same flags as scripts/setup.sh: GGML_NATIVE=OFF so the image runs on any x86-64 host with AVX2 (a native
# build from the build host can crash elsewhere); add e.g. -DGGML_RPC=ON with --build-arg LLAMA_CMAKE_ARGS.
ARG LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF"
RUN CMAKE_ARGS="$LLAMA_CMAKE_ARGS" pip wheel --no-cache-dir --no-deps -w /wheels "llama-cpp-python==0.3.36"
COPY pyproject.toml ./
COPY proto proto
COPY client client
COPY service service
RUN pip wheel --no-cache-dir --find-links /wheels -w /wheels ".[server]"

FROM python:3.11-slim
# libgomp1: llama.cpp's CPU backend runs its threads with OpenMP.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels /tmp/wheels
RUN pip install --no-cache-dir --no-index --find-links /tmp/wheels "lmscope[server]" && rm -rf /tmp/wheels

RUN useradd --create-home --uid 10001 lmscope
USER 10001
ENV LMSCOPE_HOME=/home/lmscope/.cache/lmscope
WORKDIR /home/lmscope
# The default model (SmolLM2-135M-Instruct Q4_1, 98 MB, sha256-checked) baked into the image; with 0, mount
# a GGUF file and pass --model.
ARG PULL_DEFAULT_MODEL=1
RUN if [ "$PULL_DEFAULT_MODEL" = 1 ]; then lmscope pull; fi

EXPOSE 50051
# Listens on every interface of the container; `lmscope serve` refuses that without TLS or --insecure.
ENTRYPOINT ["lmscope", "serve", "--host", "0.0.0.0", "--port", "50051"]
# Default: TLS and a bearer token from a mounted folder (tls.crt, tls.key, token). Replace the arguments
# to choose otherwise (they replace this whole list).
CMD ["--tls-cert", "/etc/lmscope/tls.crt", "--tls-key", "/etc/lmscope/tls.key", "--token-file", "/etc/lmscope/token"]
