# mnist serve in a container: CPU-only PyTorch (see TORCH_INDEX_URL), a non-root user, a health check.
#
#   mnist train --out runs/ship && cp runs/ship/model.pt model.pt      # any checkpoint of this project
#   docker build --build-arg TORCH_INDEX_URL=<PyTorch's CPU-only wheel index> -t mnist-serve .
#   docker run --rm -p 8000:8000 --sysctl net.ipv4.tcp_migrate_req=1 mnist-serve   # http://localhost:8000
#
# The sysctl hands connections queued on a worker that dies to another worker instead of resetting them
# (Linux 5.14+; README: How `mnist serve` runs).
#
# The server listens on 0.0.0.0 inside the container; put it behind a reverse proxy (README: Deployment)
# and name the proxy's public host with MNIST_ALLOWED_HOSTS, e.g. -e MNIST_ALLOWED_HOSTS=digits.example.org.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

# The CPU build of torch first: the default wheel carries CUDA, several GB a CPU server never uses. Pass the
# CPU-only index that pytorch.org's install page gives for pip; without it the default (CUDA) wheel is used.
ARG TORCH_INDEX_URL=""
RUN if [ -n "$TORCH_INDEX_URL" ]; then pip install --index-url "$TORCH_INDEX_URL" torch torchvision; fi
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install '.[serve,export]' && useradd --create-home --uid 10001 mnist
COPY --chown=mnist model.pt /app/model.pt

USER mnist
EXPOSE 8000
ENV MNIST_ALLOWED_HOSTS=""
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2).status != 200)"
# --workers 0: one worker per CPU the container may run on (docker run --cpuset-cpus); with a --cpus quota
# instead, pass the matching count: docker run ... mnist-serve mnist serve ... --workers 2
CMD ["sh", "-c", "exec mnist serve --checkpoint /app/model.pt --host 0.0.0.0 --port 8000 --workers 0 --allowed-hosts \"$MNIST_ALLOWED_HOSTS\""]
