# The image that deploy/kubernetes.yaml runs: `docker build -t petsage/petsage-grpc:0.1.0 .`
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY petsage_grpc ./petsage_grpc
RUN pip install --no-cache-dir ".[all]" && useradd --uid 10001 --no-create-home petsage
USER 10001
# glibc reads this before any thread starts: grpc core's threads share 2 malloc arenas,
# so memory freed after a flood can be given back (the server's mallopt call is the
# fallback where it is not set). The memory budget is read from the container's cgroup.
ENV MALLOC_ARENA_MAX=2
# gRPC, the HTTP face (status page, /readyz, /metrics), the probe listener: as in the manifest.
EXPOSE 50051 8080 8081
ENTRYPOINT ["petsage-grpc"]
CMD ["serve"]
